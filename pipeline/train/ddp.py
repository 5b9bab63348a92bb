"""A deploy under torchrun: rank 0 walks the chain, every rank fine-tunes (DDP), only rank 0 writes.

`edgeship deploy` (or a script calling `pipeline.deploy`) started by torchrun on one node or several
(`torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint host:29500 -m pipeline deploy ...`)
finds RANK/WORLD_SIZE in its environment (pipeline/train/world.py), joins the process group (env://: gloo on
CPU, NCCL on GPUs) and then:

- rank 0 runs the deploy as usual: every stage, the cache, the run lock, the outputs. Where a stage has
  work for every rank it sends a job over a gloo control group and does its own share:
  - `finetune`: the fine-tune stage, every search trial's and every iterative step's short distillation
    (the student and the teacher, the settings, the training data's fingerprint); each rank trains its
    DistributedSampler share;
  - `sensitivity`: the sensitivity stage's (group, level) measurements, dealt out round-robin and gathered
    back (pipeline/stages/sensitivity.py registers it);
- every other rank builds the same request from the same arguments (so the same data plan, its own reads of
  the same files on its node), waits for jobs, does its share, writes nothing, and returns when rank 0 says
  the deploy is over.

A rank that dies ends the job: torchrun stops the others and names the rank (pipeline/train/launch.py turns
that into edgeship's error); the stage that was running leaves no output, so a rerun resumes there.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from torch import nn

from pipeline.errors import PipelineError
from pipeline.train.world import World, world_from_env

if TYPE_CHECKING:
    from pipeline.request import DeployRequest

log = logging.getLogger(__name__)

T = TypeVar("T")
WAIT = timedelta(hours=48)  # how long other ranks wait for rank 0 between jobs (it runs the other stages)


class DistributedError(PipelineError):
    """A rank of a torch.distributed fine-tune failed or saw something other than rank 0 saw."""


@dataclass
class Session:
    """This process's membership of the job: its place and the control group jobs are sent over."""

    world: World
    control: Any  # a gloo ProcessGroup

    def send(self, job: dict[str, Any] | None) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([job], src=0, group=self.control)

    def receive(self) -> dict[str, Any] | None:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


_session: Session | None = None


def current_world() -> World:
    """The world this process trains in: the joined session's, else a world of one."""
    return _session.world if _session is not None else World()


def current_session() -> Session | None:
    return _session


def _backend(device_text: str) -> str:
    import torch

    gpu = device_text != "cpu" and torch.cuda.is_available() and torch.distributed.is_nccl_available()
    return "nccl" if gpu else "gloo"


CHILD_ENV = "EDGESHIP_TORCHRUN_CHILD"  # set by pipeline/train/launch.py for the ranks of `deploy --nproc`


def _die_with_agent() -> None:
    """A rank of `deploy --nproc` ends with its torchrun agent, even when the agent is killed outright (torchrun
    starts each rank in its own session, out of reach of the launcher's process-group kill)."""
    import sys

    if os.environ.get(CHILD_ENV) != "1" or sys.platform != "linux":
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the agent is already gone
        os._exit(1)


@contextlib.contextmanager
def joined(world: World, device_text: str) -> Iterator[Session]:
    """Join the process group torchrun's environment describes (env://); left again on exit."""
    global _session
    import torch
    import torch.distributed as dist

    from pipeline.train.device import resolve_device

    _die_with_agent()
    backend = _backend(device_text)
    if backend == "nccl":  # NCCL works on the current device: this rank's GPU
        torch.cuda.set_device(resolve_device(device_text, local_rank=world.local_rank).device)
    try:
        dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.size)
        control = dist.new_group(backend="gloo", timeout=WAIT)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {world.rank} of {world.size}: cannot join the process group (env://, "
                               f"{backend}): {str(exc).splitlines()[0]}") from None  # fmt: skip
    _session = Session(world, control)
    try:
        yield _session
    finally:
        _session = None
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def distributed_deploy(req: DeployRequest, run: Callable[[], T]) -> T | None:
    """`run()` (the deploy) as this process's rank asks: alone when torchrun did not start it; on rank 0 with
    the others released when it ends (also on an error); on the other ranks, serve fine-tuning jobs instead
    (returns None). The fine-tuning device is checked first, before any stage runs."""
    from pipeline.train.device import resolve_device

    world = world_from_env()
    ft = req.target.finetune
    resolve_device(ft.device, ft.amp, local_rank=world.local_rank)  # a GPU asked for and absent: say so now
    if not world.distributed:
        return run()
    with joined(world, ft.device) as session:
        if not world.is_main:
            serve(session, req)
            return None
        try:
            result = run()
        except DistributedError:
            raise  # a collective failed: a peer is gone, nobody is left to release
        except BaseException:
            _release(session)
            raise
        _release(session)
        return result


def _release(session: Session) -> None:
    """Tell the other ranks the deploy is over (they return)."""
    with contextlib.suppress(Exception):
        session.send(None)


Handler = Callable[[dict[str, Any], "DeployRequest", Session], Any]
HANDLERS: dict[str, Handler] = {}  # job kind -> what a rank other than 0 does with it (see `register`)
_WORDS = {"finetune": "fine-tuning"}


def register(kind: str, handler: Handler) -> None:
    """Let rank 0 send jobs of `kind` (a stage registers its own where it has work for every rank; its jobs
    name that module as "module", for ranks that have not imported it yet)."""
    HANDLERS[kind] = handler


def serve(session: Session, req: DeployRequest) -> None:
    """A rank other than 0: do its share of each job rank 0 sends, until it sends None."""
    while (job := session.receive()) is not None:
        kind = job.get("kind", "finetune")
        log.info("rank %d: %s job received", session.world.rank, _WORDS.get(kind, kind))
        module = job.get("module", "")
        if kind not in HANDLERS and module.startswith("pipeline."):  # the module that registers the kind
            importlib.import_module(module)
        if kind not in HANDLERS:
            raise DistributedError(f"rank {session.world.rank}: a {kind!r} job, which this rank does not know; "
                                   "every node must run the same edgeship")  # fmt: skip
        HANDLERS[kind](job, req, session)


def gather(session: Session, mine: Any) -> list[Any]:
    """Every rank's `mine`, in rank order, on every rank (over the control group)."""
    import torch.distributed as dist

    out: list[Any] = [None] * session.world.size
    try:
        dist.all_gather_object(out, mine, group=session.control)
    except RuntimeError as exc:
        raise collective_error(exc, session.world) from exc
    return out


def checkpoint_bytes(model: nn.Module, meta: dict[str, Any] | None = None) -> bytes:
    """`model` as the checkpoint file edgeship writes, in memory (for a job: nodes need not share a disk)."""
    from pipeline.models.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="edgeship-job-") as tmp:
        path = Path(tmp) / "model.pt"
        save_checkpoint(model, path, meta=meta or {})
        return path.read_bytes()


def load_bytes(blob: bytes, req: DeployRequest) -> nn.Module:
    """A checkpoint sent in a job, built as the request's model."""
    from pipeline.models.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="edgeship-rank-") as tmp:
        path = Path(tmp) / "model.pt"
        path.write_bytes(blob)
        return load_checkpoint(path, req.spec.build())[0]


def make_job(student: Path | bytes, teacher: Path | bytes, cfg: Any, *, seed: int, data: dict[str, Any]
             ) -> dict[str, Any]:  # fmt: skip
    """What every rank needs to fine-tune: both checkpoints' bytes (nodes need not share a disk), the
    settings, the seed and the training data's fingerprint (to refuse ranks that see other data)."""
    blobs = [m.read_bytes() if isinstance(m, Path) else m for m in (student, teacher)]
    return {"kind": "finetune", "student": blobs[0], "teacher": blobs[1], "cfg": cfg.model_dump(mode="json"),
            "seed": seed, "data": data}  # fmt: skip


def train_job(job: dict[str, Any], req: DeployRequest, world: World) -> Any:
    """Fine-tune this rank's share of `job` (no validation, no outputs: rank 0 keeps and writes the model)."""
    from pipeline.targets import Finetune
    from pipeline.train.distill import finetune_kd

    mine = req.data.fingerprints()["train"]
    if mine != job["data"]:
        raise DistributedError(f"rank {world.rank}: its training data is not rank 0's (rank 0: {job['data']}; "
                               f"rank {world.rank}: {mine}); give every node the same --data")  # fmt: skip
    models = [load_bytes(job[name], req) for name in ("student", "teacher")]
    return finetune_kd(models[0], models[1], req.spec, req.data.train_stream, Finetune(**job["cfg"]),
                       seed=job["seed"], world=world)  # fmt: skip


def collective_error(exc: BaseException, world: World) -> DistributedError:
    """The error rank 0 gives when a collective fails: another rank has gone (torchrun names it)."""
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return DistributedError(
        f"fine-tuning on {world.size} processes: a collective failed on rank {world.rank} ({first}): another rank "
        "stopped; torchrun's summary names it. Finished stages are kept: run the same command again to resume"
    )


register("finetune", lambda job, req, session: train_job(job, req, session.world))
