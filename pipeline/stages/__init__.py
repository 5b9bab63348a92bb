"""The deploy chain, one declared stage per module, in the order `pipeline.deploy` runs them:

baseline -> export_baseline -> convert_baseline -> latency_table (latency budgets only) -> sensitivity
(sensitivity allocation only) -> prune -> finetune
-> export -> convert -> edgetpu (Edge TPU targets only) -> verify -> profile

A new stage is one new module here plus one line in CHAIN.
"""

from pipeline.stages.base import Context, Stage
from pipeline.stages.baseline import BASELINE
from pipeline.stages.convert import CONVERT
from pipeline.stages.convert_baseline import CONVERT_BASELINE
from pipeline.stages.edgetpu import EDGETPU
from pipeline.stages.export import EXPORT
from pipeline.stages.export_baseline import EXPORT_BASELINE
from pipeline.stages.finetune import FINETUNE
from pipeline.stages.latency_table import LATENCY_TABLE
from pipeline.stages.profile import PROFILE
from pipeline.stages.prune import PRUNE
from pipeline.stages.sensitivity import SENSITIVITY
from pipeline.stages.verify import VERIFY

CHAIN: tuple[Stage, ...] = (
    BASELINE,
    EXPORT_BASELINE,
    CONVERT_BASELINE,
    LATENCY_TABLE,
    SENSITIVITY,
    PRUNE,
    FINETUNE,
    EXPORT,
    CONVERT,
    EDGETPU,
    VERIFY,
    PROFILE,
)

__all__ = [
    "BASELINE",
    "CHAIN",
    "CONVERT",
    "EDGETPU",
    "FINETUNE",
    "PROFILE",
    "PRUNE",
    "SENSITIVITY",
    "VERIFY",
    "Context",
    "Stage",
]
