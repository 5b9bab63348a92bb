"""Which process of a torch.distributed job this is, read from torchrun's environment (env:// rendezvous).

torchrun (`python -m torch.distributed.run`) sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT for every process it starts, on one node (`--standalone`) or several (`--nnodes`, `--rdzv-*`).
Without them this is the one process of a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    """This process's place in the job torchrun started (a world of one when none did); UsageError when the
    variables are there but inconsistent."""
    if "WORLD_SIZE" not in environ:
        return World()
    try:
        rank, size = int(environ.get("RANK", "0")), int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", "0"))
        local_size = int(environ.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE, LOCAL_RANK must be integers (as torchrun sets them)") from None
    if size < 1 or not 0 <= rank < size or not 0 <= local_rank < max(1, local_size):
        raise UsageError(f"RANK={rank} WORLD_SIZE={size} LOCAL_RANK={local_rank}: not a valid torchrun rank")
    return World(rank, size, local_rank, local_size)
