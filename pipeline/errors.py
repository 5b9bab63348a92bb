"""The package's error types. Library code raises these; only the CLI turns them into exit codes.

Every message says what went wrong and what to do about it.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error edgeship raises on purpose."""

    exit_code = 1


class TargetConfigError(PipelineError):
    """A target profile is missing, unreadable or invalid (names file, field path, valid values)."""

    exit_code = 2


class UsageError(PipelineError):
    """A command-line option or model specification is invalid."""

    exit_code = 2


class DatasetError(PipelineError):
    """A dataset, image folder or calibration set is missing or unusable."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit the model."""


class PruningError(PipelineError):
    """The pruner cannot reach its target or cannot handle a layer."""


class ExportError(PipelineError):
    """ONNX export failed or the exported graph disagrees with PyTorch."""


class ConversionError(PipelineError):
    """onnx2tf (or the Edge TPU compiler) failed; carries the tail of the tool's output."""


class VerificationError(PipelineError):
    """A converted model cannot be run or disagrees with PyTorch beyond tolerance."""


class BudgetError(PipelineError):
    """The result misses a budget of the target profile (accuracy, size, latency)."""

    exit_code = 3


class DeviceError(PipelineError):
    """A device cannot be reached or the benchmark on it failed."""


class DevicesFailed(DeviceError):
    """Profiling failed on one or more of several devices; `runs` holds what every device gave."""

    def __init__(self, message: str, runs: object) -> None:
        super().__init__(message)
        self.runs = runs


class LockError(PipelineError):
    """Another run holds the lock of the same target."""


class StorageError(PipelineError):
    """A file cannot be written: the disk is full, or a quota or file-size limit is reached."""


class ShipError(PipelineError):
    """A bundle cannot be shipped into an app: unknown app layout, unsafe destination, newer model there."""
