"""Where fine-tuning runs: `finetune.device` (auto | cpu | cuda | cuda:N) resolved against what torch sees, with
mixed precision (bf16 where the GPU has it, else fp16 with a gradient scaler) and channels_last on a GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pipeline.errors import UsageError

DEVICES = "auto, cpu, cuda, cuda:N"


@dataclass(frozen=True)
class TrainDevice:
    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None: float32 throughout
    channels_last: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def needs_scaler(self) -> bool:
        return self.amp == torch.float16

    def describe(self) -> str:
        """e.g. 'cuda:0 (NVIDIA H200), bf16 autocast, channels_last' or 'cpu (2 threads), float32'."""
        n = torch.get_num_threads()
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else f"{n} thread{'s' if n != 1 else ''}"
        precision = f"{str(self.amp).removeprefix('torch.')} autocast" if self.amp is not None else "float32"
        return f"{self.device} ({name}), {precision}" + (", channels_last" if self.channels_last else "")


def resolve_device(text: str, amp: str = "auto", *, local_rank: int = 0) -> TrainDevice:
    """The device `text` names (under DDP a rank uses GPU N + its local rank); UsageError when it asks for a
    GPU torch cannot see."""
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and not index.isdigit()):
        raise UsageError(f"finetune.device: {text!r} is not a training device; valid: {DEVICES}")
    have = torch.cuda.is_available()
    if kind == "cuda" and not have:
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f", CUDA_VISIBLE_DEVICES={seen!r}" if seen is not None else ""
        raise UsageError(f"finetune.device {text}: torch {torch.__version__} sees no CUDA GPU ({why}{hint}); "
                         "use --device cpu, or auto to take a GPU when there is one")  # fmt: skip
    if kind == "cpu" or (kind == "auto" and not have):
        if amp in ("bf16", "fp16"):
            return TrainDevice(torch.device("cpu"), torch.bfloat16 if amp == "bf16" else torch.float16, False)
        return TrainDevice(torch.device("cpu"), None, False)
    n = torch.cuda.device_count()
    want = int(index or 0) + local_rank
    if want >= n:
        raise UsageError(f"finetune.device {text}: GPU {want} asked for (local rank {local_rank}), torch sees {n}; "
                         f"valid: cuda:0..cuda:{n - 1}")  # fmt: skip
    device = torch.device("cuda", want)
    if amp == "off":
        dtype = None
    elif amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    return TrainDevice(device, dtype, True)
