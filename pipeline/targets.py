"""Target profiles: one YAML file per target, validated once into a frozen object.

Every error names the file, the field path and, where there is a fixed set, the valid values:
``targets/coral.yaml: quantize -> ship: the Edge TPU runs only full-integer models; set ship: int8``.
Nothing in a profile is evaluated as code (``yaml.safe_load`` only).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import TargetConfigError

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
ALIASES_FILE = "aliases.yaml"

Precision = Literal["fp32", "fp16", "int8"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Hardware(_Frozen):
    """What the device is."""

    arch: Literal["aarch64", "armv7l", "x86_64"]
    cpu: str = Field(min_length=1)
    cores: int = Field(ge=1, le=256)
    memory_mb: int = Field(ge=16)
    runtime: Literal["litert", "tflite_runtime"] = "litert"
    accelerator: Literal["none", "edgetpu"] = "none"
    edgetpu_sram_mb: float | None = Field(default=None, gt=0)


class Budgets(_Frozen):
    """What the deployed model must meet. A budget left out is not checked."""

    latency_ms: float | None = Field(default=None, gt=0)
    max_size_kb: float | None = Field(default=None, gt=0)
    max_accuracy_drop: float = Field(default=0.02, ge=0, le=1)
    edgetpu_min_mapped: float | None = Field(default=None, ge=0, le=1)  # share of ops on the Edge TPU


class PruneTarget(_Frozen):
    """Keep this fraction of the unpruned model's MACs or parameters, or fit `budgets.latency_ms` as measured
    on the target's runtime (metric: latency; `max_points` caps the latency table's grid per axis), or
    (metric: accuracy) prune as far as `budgets.max_accuracy_drop` allows: a bounded search over the share of
    MACs kept, each trial pruned and briefly fine-tuned, judged on the validation split (`pruning.search`)."""

    metric: Literal["macs", "params", "latency", "accuracy"] = "macs"
    keep: float | None = Field(default=None, gt=0, le=1)
    max_points: int = Field(default=16, ge=2, le=64)

    @model_validator(mode="after")
    def _keep_given(self) -> PruneTarget:
        if self.metric in ("macs", "params") and self.keep is None:
            raise ValueError(f"keep: metric {self.metric} needs keep (the fraction of {self.metric} to keep)")
        if self.metric == "latency" and self.keep is not None:
            raise ValueError("keep: metric latency takes its target from budgets.latency_ms; remove keep")
        if self.metric == "accuracy" and self.keep is not None:
            raise ValueError("keep: metric accuracy searches for the keep that budgets.max_accuracy_drop allows; "
                             "remove keep (or bound the search with pruning.search.min_keep)")  # fmt: skip
        return self


class Search(_Frozen):
    """The accuracy search (`pruning.target: {metric: accuracy}`): at most `trials` trials between keeping
    `min_keep` of the MACs and keeping all; each trial is pruned, BatchNorm re-estimated, fine-tuned for
    `finetune_steps` steps and scored on the validation split. It stops early once a passing trial is within
    `tolerance` of the budget's edge."""

    trials: int = Field(default=7, ge=2, le=16)
    finetune_steps: int = Field(default=150, ge=0, le=100_000)
    min_keep: float = Field(default=0.15, gt=0, lt=1)
    tolerance: float = Field(default=0.005, gt=0, le=0.1)
    images: int = Field(default=1000, ge=16, le=50_000)  # validation images each trial is scored on
    # which passing trial wins: the fewest MACs, or the lowest latency predicted by the target's latency table
    # (measured on the device, like metric: latency)
    rank: Literal["macs", "latency"] = "macs"


class Sensitivity(_Frozen):
    """How the sensitivity stage measures each prunable group: pruned alone to each level (share of its
    channels removed), BatchNorm re-estimated, then validation loss and accuracy on `images` images."""

    levels: tuple[float, ...] = (0.25, 0.5, 0.75)
    images: int = Field(default=300, ge=16, le=50_000)

    @model_validator(mode="after")
    def _levels(self) -> Sensitivity:
        if not self.levels or any(not 0 < x < 1 for x in self.levels) or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels: distinct increasing shares of channels removed, each in (0, 1); got "
                             f"{list(self.levels)}")  # fmt: skip
        return self


class Pruning(_Frozen):
    """How to prune: the target, which channels go (`importance`), and how the cut is shared between layers
    (`allocation`: `sensitivity` spends it where the measured validation loss rises least per MAC saved,
    `uniform` takes the same share of every layer; `global: true` lets Torch-Pruning rank channels across
    layers by importance instead)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)

    enabled: bool = True
    target: PruneTarget = PruneTarget(metric="macs", keep=0.5)
    channel_multiple: int = Field(default=8, ge=1, le=256)
    importance: Literal["l1", "l2", "taylor", "lamp", "bn_scale", "hessian"] = "l2"
    global_pruning: bool = Field(default=False, alias="global")
    allocation: Literal["sensitivity", "uniform"] = "sensitivity"
    # allocation: sensitivity on a MAC/param target: a uniform cut of the same size is pruned and recovered too,
    # and the better of the two on the validation split, before fine-tuning, is kept (pipeline/pruning/guard.py).
    # Off by default: on the default deploy it kept the uniform cut, which ended 0.41 points lower after
    # fine-tuning (int8 88.96% vs 89.37%); it helps where fine-tuning cannot recover (EfficientNet-Lite0)
    compare_uniform: bool = False
    sensitivity: Sensitivity = Sensitivity()
    keep_layers: tuple[str, ...] = ()
    max_layer_ratio: float = Field(default=0.8, gt=0, lt=1)
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics on training images after pruning (trials)
    # refit the layers that read pruned channels by least squares against the unpruned model's outputs, on
    # training images, before fine-tuning (pipeline/pruning/reconstruct.py); their BatchNorm statistics are then
    # the unpruned ones, so recalibrate_bn applies only to the trials (sensitivity, the NetAdapt path)
    reconstruct: bool = True
    steps: int = Field(default=1, ge=1, le=20)  # iterative: prune -> re-estimate BN -> short distillation, N times
    step_finetune_steps: int = Field(default=100, ge=0, le=100_000)  # distillation steps between iterative steps
    search: Search = Search()

    @model_validator(mode="after")
    def _one_allocation(self) -> Pruning:
        if self.global_pruning and self.allocation == "sensitivity":
            raise ValueError(
                "global: true ranks channels across layers by importance, allocation: sensitivity by measured "
                "loss; pick one (allocation: uniform with global: true for Torch-Pruning's global ranking)"
            )
        if self.global_pruning and self.target.metric == "latency":
            raise ValueError("global: latency budgets allocate channels from the latency table; set global: false")
        if self.steps > 1 and self.target.metric not in ("macs", "params"):
            raise ValueError(f"steps: iterative pruning ({self.steps} steps) walks to a MAC or parameter target; "
                             f"metric {self.target.metric} takes one step (steps: 1)")  # fmt: skip
        return self


class Finetune(_Frozen):
    """Recovery fine-tuning with knowledge distillation from the unpruned model."""

    epochs: float = Field(default=1.0, ge=0, le=100)
    lr: float = Field(default=1e-3, gt=0, lt=1)
    batch_size: int = Field(default=128, ge=1, le=4096)
    temperature: float = Field(default=4.0, gt=0, le=50)
    alpha: float = Field(default=0.7, ge=0, le=1)
    max_train_images: int | None = Field(default=None, ge=1)
    min_steps: int = Field(default=200, ge=0, le=1_000_000)  # however small the data: at least this many steps
    warmup: float = Field(default=0.1, ge=0, lt=1)  # share of the steps warming up, then cosine decay
    early_stopping: bool = True  # evaluate on the validation split and keep the best checkpoint
    evaluations: int = Field(default=8, ge=1, le=1000)  # how many times during the run
    # BatchNorm while training: "train" uses batch statistics (and updates the running ones), "frozen" keeps the
    # running statistics and trains only scale and shift; auto: frozen for per-process batches under 16 images
    bn: Literal["auto", "train", "frozen"] = "auto"
    # where (issue 18): auto = the first CUDA GPU when torch sees one, else the CPU; --device/--set override it
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 where the GPU has it, else fp16; off on CPU
    workers: int | None = Field(default=None, ge=0, le=64)  # DataLoader decoding processes per rank; None: auto

    @model_validator(mode="after")
    def _device_named(self) -> Finetune:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:[0-9]{1,2}", self.device):
            raise ValueError(f"device: {self.device!r} is not a training device; valid: auto, cpu, cuda, cuda:N")
        return self


RANGE_METHODS = "'measured', 'mse' or 'percentile:Q' with 90 <= Q < 100 (e.g. 'percentile:99.99')"


def range_method(method: str) -> tuple[str, float] | None:
    """("measured", 0), ("mse", 0) or ("percentile", Q) for a range method (pipeline/quantize/ranges.py), None
    for anything else: the one parser of the format (the profile's `quantize.calibration_ranges`, the bench,
    tfconv)."""
    if method in ("measured", "mse"):
        return method, 0.0
    m = re.fullmatch(r"percentile:(\d{2}(?:\.\d{1,6})?)", method)
    if m is None or not 90 <= float(m.group(1)) < 100:
        return None
    return "percentile", float(m.group(1))


class Quantize(_Frozen):
    """`ship: auto` ships the fastest precision, measured where the model is profiled (the device, else this
    host), whose accuracy drop stays within `budgets.max_accuracy_drop`; the decisions made before that (the
    latency table, the unpruned reference) use `plan_precision`, the first of `precisions`."""

    precisions: tuple[Precision, ...] = ("fp32", "fp16", "int8")
    ship: Precision | Literal["auto"] = "int8"
    int8_io: Literal["int8", "uint8", "float32"] = "int8"
    calibration_images: int = Field(default=200, ge=10, le=5000)
    # issue 14: int8 top-1 agreement with PyTorch on the validation split the remedies work to reach (the
    # shipped int8 model stops the deploy, exit 3, below it); the remedies run in this order, those listed
    min_agreement: float = Field(default=0.99, ge=0, le=1)
    # and, when set, the int8 file's validation accuracy may sit at most this far (a fraction: 0.005 = half a
    # point) below the float model's: the remedies go on until both hold (unset: agreement alone)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)
    # `int16x8` (int16 activations, int8 weights) is opt-in: only TFLite's built-in CPU kernels run it, slower
    # than XNNPACK's int8, and never on Edge TPU
    remedies: tuple[
        Literal["calibration", "equalization", "range_tuning", "bias_correction", "selective", "int16x8", "qat"], ...
    ] = ("calibration", "equalization", "range_tuning", "bias_correction", "selective", "qat")  # fmt: skip
    max_float_ops: int = Field(default=4, ge=0, le=64)  # selective: at most this many ops kept float (not Edge TPU)
    qat_steps: int = Field(default=300, ge=10, le=100_000)  # quantization-aware distillation steps
    remedy_images: int = Field(default=1000, ge=50, le=100_000)  # validation images the remedies are judged on
    # the `calibration` remedy also tries these activation ranges in place of TensorFlow's calibrator's min/max,
    # from each tensor's values on the calibration images: "measured" (their true min/max, which the calibrator
    # gets wrong for a tensor an in-place op reuses), "mse" (least expected int8 error over a histogram) or
    # "percentile:Q" (the central Q% of the values, 90 <= Q < 100); [] tries the calibrator's only
    calibration_ranges: tuple[str, ...] = ("measured", "mse", "percentile:99.99")

    @model_validator(mode="after")
    def _ship_is_built(self) -> Quantize:
        if len(set(self.remedies)) != len(self.remedies):
            raise ValueError(f"remedies: listed twice: {list(self.remedies)}")
        for method in self.calibration_ranges:
            if range_method(method) is None:
                raise ValueError(f"calibration_ranges: {method!r} is not a range method; valid: {RANGE_METHODS}")
        if len(set(self.calibration_ranges)) != len(self.calibration_ranges):
            raise ValueError(f"calibration_ranges: listed twice: {list(self.calibration_ranges)}")
        if self.ship != "auto" and self.ship not in self.precisions:
            raise ValueError(f"ship: {self.ship!r} is not among precisions {list(self.precisions)}; list it there "
                             "or use ship: auto (the fastest precision within the accuracy budget)")  # fmt: skip
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError(f"precisions: listed twice: {list(self.precisions)}")
        return self

    @property
    def plan_precision(self) -> Precision:
        """The precision the pre-profiling decisions use: the shipped one, or under auto the first listed."""
        return self.precisions[0] if self.ship == "auto" else self.ship

    @property
    def baseline_precisions(self) -> tuple[Precision, ...]:
        """The unpruned model's precisions converted for the before/after comparison."""
        return self.precisions if self.ship == "auto" else (self.ship,)


class Profiling(_Frozen):
    threads: int = Field(default=2, ge=1, le=256)
    warmup: int = Field(default=20, ge=0, le=10_000)
    runs: int = Field(default=200, ge=1, le=1_000_000)
    min_seconds: float = Field(default=2.0, ge=0, le=600)  # keep timing fast models at least this long


class LocalTransport(_Frozen):
    kind: Literal["local"]


class SshTransport(_Frozen):
    kind: Literal["ssh"]
    host: str | None = Field(default=None, min_length=1, pattern=r"^[A-Za-z0-9._:\[\]-]+$")
    user: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    port: int = Field(default=22, ge=1, le=65535)
    python: str = Field(default="python3", pattern=r"^[A-Za-z0-9._/+-]+$")
    workdir: str = Field(default="/tmp/edgeship", pattern=r"^/[A-Za-z0-9._/+-]*$")


class AdbTransport(_Frozen):
    kind: Literal["adb"]
    serial: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]+$")
    workdir: str = Field(default="/data/local/tmp/edgeship", pattern=r"^/[A-Za-z0-9._/+-]*$")


Transport = Annotated[LocalTransport | SshTransport | AdbTransport, Field(discriminator="kind")]


class Power(_Frozen):
    """How power is read; with kind none, `idle_w`/`active_w` give an energy estimate (labelled so)."""

    kind: Literal["none", "rpi5_pmic", "hwmon", "android_battery", "odpm", "rapl"] = "none"
    idle_w: float | None = Field(default=None, gt=0)
    active_w: float | None = Field(default=None, gt=0)
    # sensor options passed to the device-side sampler (pipeline/remote/power_sampler.py)
    gain: float | None = Field(default=None, gt=0, le=10)  # rpi5_pmic calibration: W_board = gain * W_pmic + offset
    offset_w: float | None = Field(default=None, ge=-10, le=10)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")  # hwmon chip name (ina219, ina226, ina260)
    supply: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")  # android power_supply name (battery)
    current_unit: Literal["uA", "mA"] | None = None
    voltage_unit: Literal["uV", "mV"] | None = None
    rails: tuple[str, ...] | None = None  # odpm rails to sum (default: all)
    zones: tuple[str, ...] | None = None  # rapl zones to sum (default: package-*)
    rate_hz: float | None = Field(default=None, gt=0, le=1000)
    idle_s: float = Field(default=3.0, ge=0, le=60)  # idle power measured this long before the benchmark


class TargetProfile(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    hardware: Hardware
    budgets: Budgets = Budgets()
    pruning: Pruning = Pruning()
    finetune: Finetune = Finetune()
    quantize: Quantize = Quantize()
    profiling: Profiling = Profiling()
    transport: Transport = LocalTransport(kind="local")
    power: Power = Power()

    @model_validator(mode="after")
    def _combinations(self) -> TargetProfile:
        if self.hardware.accelerator == "edgetpu":
            if self.quantize.ship != "int8":
                raise ValueError(
                    f"quantize.ship: the Edge TPU runs only full-integer models; set ship: int8 "
                    f"(got {self.quantize.ship!r})"
                )
            if self.quantize.int8_io == "float32":
                raise ValueError("quantize.int8_io: the Edge TPU needs integer I/O; use int8 or uint8")
        elif self.budgets.edgetpu_min_mapped is not None:
            raise ValueError("budgets.edgetpu_min_mapped: only an Edge TPU target (hardware.accelerator: edgetpu) "
                             f"maps ops to an Edge TPU, this one has accelerator {self.hardware.accelerator!r}; "
                             "remove the field")  # fmt: skip
        if self.pruning.target.metric == "latency" and self.budgets.latency_ms is None:
            raise ValueError("pruning.target.metric: latency needs budgets.latency_ms")
        b = self.budgets
        if self.pruning.target.metric == "accuracy" and ("max_accuracy_drop" not in b.model_fields_set
                                                         or b.max_accuracy_drop <= 0):  # fmt: skip
            raise ValueError(
                "pruning.target.metric: accuracy prunes as far as budgets.max_accuracy_drop allows; set "
                "budgets.max_accuracy_drop in this profile to a share above 0 (0.01 = one point of accuracy)"
            )
        if self.profiling.threads > self.hardware.cores:
            raise ValueError(
                f"profiling.threads: {self.profiling.threads} threads on a {self.hardware.cores}-core device; "
                f"use at most {self.hardware.cores}"
            )
        return self

    def digest(self) -> str:
        """sha256 of the validated profile (stable across key order and comments)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def available_targets(targets_dir: Path = TARGETS_DIR) -> list[str]:
    names = {p.stem for p in targets_dir.glob("*.yaml") if p.name != ALIASES_FILE}
    return sorted(names | set(_aliases(targets_dir)))


def _aliases(targets_dir: Path) -> dict[str, str]:
    path = targets_dir / ALIASES_FILE
    if not path.exists():
        return {}
    data = _read_yaml(path)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise TargetConfigError(f"{path}: expected a mapping of alias: target name")
    return data


def resolve_target_path(name_or_path: str, targets_dir: Path = TARGETS_DIR) -> Path:
    """A target name (``rpi``, ``coral``), an alias, or a path to a YAML file -> the file."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        if not _is_file(path):
            raise TargetConfigError(f"{_short(str(path))}: no such target profile file")
        return path
    name = _aliases(targets_dir).get(name_or_path, name_or_path)
    path = targets_dir / f"{name}.yaml"
    if _is_file(path) and name != ALIASES_FILE.removesuffix(".yaml"):
        return path
    valid = available_targets(targets_dir)
    close = difflib.get_close_matches(name_or_path, valid, n=1) if len(name_or_path) <= 64 else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise TargetConfigError(f"unknown target {_short(name_or_path)!r}.{hint} Valid targets: {', '.join(valid)}")


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False also for names the OS refuses (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def load_target(
    name_or_path: str, targets_dir: Path = TARGETS_DIR, *, overrides: tuple[str, ...] = ()
) -> TargetProfile:
    """Load and validate a profile. `overrides` are `field.path=value` settings from the command line
    (`--set pruning.target.keep=0.8`), values read as YAML scalars, validated like the file itself."""
    path = resolve_target_path(name_or_path, targets_dir)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise TargetConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return validate_profile(data, path, overrides)


def override_target(profile: TargetProfile, overrides: tuple[str, ...]) -> TargetProfile:
    """`profile` with `field.path=value` settings applied, checked exactly like `load_target(overrides=...)`."""
    return validate_profile(
        profile.model_dump(mode="json", exclude_unset=True), Path(f"profile {profile.name}"), overrides
    )


def validate_profile(data: dict[str, Any], path: Path, overrides: tuple[str, ...] = ()) -> TargetProfile:
    """A profile from `data` (read from `path`, named in every error), overrides applied."""
    # JSON mode: strict types (no "4" for 4), YAML lists accepted where a tuple is declared.
    data = _plain(data, path)
    for item in overrides:
        _apply_override(data, item, path)
    blob = json.dumps(data)
    try:
        return TargetProfile.model_validate_json(blob)
    except ValidationError as exc:
        raise TargetConfigError(_format_errors(path, exc)) from None


def _apply_override(data: dict[str, Any], item: str, path: Path) -> None:
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[a-z_][a-z0-9_]*", p) for p in parts):
        raise TargetConfigError(
            f"--set {item!r}: expected field.path=value with fields as in {path.name}, e.g. pruning.target.keep=0.8"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise TargetConfigError(f"--set {item!r}: {p} in {path.name} is a value, not a section")
        node = child
    node[parts[-1]] = _plain(value, path)


# A profile is a few dozen fields three levels deep. Anything far beyond that is a mistake or an attack: a
# YAML alias that contains itself, or aliases nested to expand into billions of values ("billion laughs").
MAX_PROFILE_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_VALUES = 10_000
_INT_LIMIT = 1 << 63


def _plain(data: Any, path: Path) -> Any:
    """A JSON-ready copy of what YAML produced: plain mappings, lists, strings, numbers, booleans and null.

    Walks the value with its aliases expanded, within MAX_DEPTH levels and MAX_VALUES values, so a
    self-referencing or exponentially aliased document is refused instead of hanging the loader.
    """
    count = 0

    def walk(value: Any, loc: tuple[str, ...]) -> Any:
        nonlocal count
        count += 1
        where = " -> ".join(loc) or "(top level)"
        if count > MAX_VALUES:
            raise TargetConfigError(
                f"{path}: more than {MAX_VALUES} values once YAML aliases are expanded; a profile has a few dozen"
            )
        if len(loc) > MAX_DEPTH:
            raise TargetConfigError(
                f"{path}: {_short(where)}: nested more than {MAX_DEPTH} levels deep (an alias that contains itself?)"
            )
        if value is None or isinstance(value, bool | str | float):
            return value
        if isinstance(value, int):
            if not -_INT_LIMIT < value < _INT_LIMIT:
                raise TargetConfigError(
                    f"{path}: {_short(where)}: the number is out of range ({value.bit_length()} bits)"
                )
            return value
        if isinstance(value, list | tuple):
            return [walk(v, (*loc, str(i))) for i, v in enumerate(value)]
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not (k is None or isinstance(k, bool | str | float) or (isinstance(k, int) and abs(k) < _INT_LIMIT)):
                    raise TargetConfigError(
                        f"{path}: {_short(where)}: key {_short(repr(k))} has YAML type {type(k).__name__}; "
                        "write keys as plain names"
                    )
                key = k if isinstance(k, str) else json.dumps(k)
                out[key] = walk(v, (*loc, key))
            return out
        raise TargetConfigError(
            f"{path}: {_short(where)}: value {_short(repr(value))} has YAML type {type(value).__name__}; "
            "write it as a plain string or number"
        )

    return walk(data, ())


def _read_yaml(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_PROFILE_BYTES:
            raise TargetConfigError(f"{path}: {size:,} bytes is not a target profile (those are a few KB)")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetConfigError(f"{path}: cannot read the profile: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TargetConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise TargetConfigError(f"{path}: not valid YAML: nested too deeply to be a target profile") from None
    except Exception as exc:  # PyYAML's constructors fail on bad tagged scalars with plain errors
        # (a 5000-digit int: ValueError; `!!timestamp` with no value: AttributeError; month 13: ValueError)
        raise TargetConfigError(f"{path}: not valid YAML: {_short(f'{type(exc).__name__}: {exc}', 300)}") from None


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
        field = " -> ".join(loc) if loc else "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; valid fields here: {', '.join(_valid_fields(err['loc']))}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "value_error" and (m := re.match(r"^([a-z0-9_.]+): (.*)$", msg, re.S)):
            field = " -> ".join([*loc, *m.group(1).split(".")])
            msg = m.group(2)
        elif isinstance(err.get("input"), (str, int, float, bool)) or err.get("input") is None:
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"{path}: {field}: {msg}")
    return "\n".join(lines)


def _is_union_tag(part: object) -> bool:
    return part in ("local", "ssh", "adb")


def _valid_fields(loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at the parent of `loc` (for an unknown-field message)."""
    model: Any = TargetProfile
    tags = {"local": LocalTransport, "ssh": SshTransport, "adb": AdbTransport}
    for part in loc[:-1]:
        if part in tags:
            model = tags[part]
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else model
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []
