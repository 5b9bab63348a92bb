"""The Python API: deploy the model you hold (in memory, or by name), from a notebook or a training script.

`deploy(model, target, data=...)` builds its DeployRequest with `build_request`, the one function
`edgeship deploy` builds its request with too, walks the chain (pipeline.deploy) and returns a DeployResult.
Nothing here prints (unless `progress=True`) or exits: progress goes to a callback (pipeline.request.Progress),
errors are the package's own (pipeline.errors) with the CLI's messages, each option spelled the way the caller
gives it (`--classes FILE` on the command line, `classes=` here).

Only light modules are imported at module level (`import pipeline` loads this one): torch, TensorFlow and the
stages are imported by the functions that need them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pipeline.errors import DatasetError, ShipError, TargetConfigError, UsageError
from pipeline.request import DeployRequest, DeployResult, Progress

if TYPE_CHECKING:
    from pipeline.data.imageset import ImageSet
    from pipeline.data.sources import DataPlan
    from pipeline.devices.profile_device import DeviceRun
    from pipeline.devices.ssh import SshOptions
    from pipeline.models.spec import ModelSpec
    from pipeline.runner import StageRecord
    from pipeline.ship import ShipResult
    from pipeline.targets import TargetProfile

# A single Dataset (neither a folder nor {"train", "test"}): this much of each class is held out as the test set.
TEST_FRACTION, TEST_MAX, TEST_SEED = 0.2, 10_000, 1


@dataclass(frozen=True)
class Spelling:
    """How the caller gives the options, for the messages of the checks both share."""

    model: str  # what a user's own model is
    classes: str  # the class-names option, bare
    classes_arg: str  # ... with its value
    shape: str  # input shape, mean and std
    needs_data: str  # what a user model's data must be
    data_dir: str  # the image-folder option
    test_images: str


CLI = Spelling(
    model="--model module:factory", classes="--classes", classes_arg="--classes FILE",
    shape="--input-shape, --mean and --std", data_dir="--data DIR", test_images="--test-images",
    needs_data="a user model needs --data DIR with DIR/train/<class>/ and DIR/test/<class>/ images",
)  # fmt: skip
PYTHON = Spelling(
    model="an nn.Module or 'package.module:factory'", classes="classes=", classes_arg="classes=[names]",
    shape="input_shape=, mean= and std=", data_dir="data=DIR", test_images="test_images=",
    needs_data="a user model needs data=: an image folder DIR with DIR/train/<class>/ and DIR/test/<class>/, "
    "a Dataset of (image, label), or {'train': ..., 'test': ...} of them",
)  # fmt: skip


def load_target(target: str | Path | TargetProfile, overrides: Mapping[str, Any] | Sequence[str] | None = None
                ) -> TargetProfile:  # fmt: skip
    """A checked target profile from a name (rpi, host, ...), a YAML path or a TargetProfile. `overrides`:
    {"finetune.epochs": 0.2} or ["finetune.epochs=0.2"], checked exactly like `edgeship deploy --set`."""
    from pipeline.targets import TargetProfile, available_targets, override_target
    from pipeline.targets import load_target as load_file

    items = override_items(overrides)
    if isinstance(target, TargetProfile):
        return override_target(target, items) if items else target
    if isinstance(target, str | Path):
        return load_file(str(target), overrides=items)
    raise UsageError(f"target: expected a name ({', '.join(available_targets())}), a YAML path or a TargetProfile, "
                     f"got {type(target).__name__}")  # fmt: skip


def override_items(overrides: Mapping[str, Any] | Sequence[str] | None) -> tuple[str, ...]:
    """`--set` items ("field.path=value") from a mapping of field paths to values, or from such items."""
    if overrides is None:
        return ()
    if isinstance(overrides, str):
        return (overrides,)
    if isinstance(overrides, Mapping):
        out = []
        for key, value in overrides.items():
            if not isinstance(key, str):
                raise TargetConfigError(f"overrides: key {key!r} is not a field path like 'pruning.target.keep'")
            try:  # a string is read as YAML, like --set's; anything else as its JSON (a YAML subset)
                out.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
            except (TypeError, ValueError):
                raise TargetConfigError(
                    f"overrides[{key!r}]: {value!r} is not a plain value (a number, string, bool, None or list)"
                ) from None
        return tuple(out)
    if isinstance(overrides, Sequence) and all(isinstance(o, str) for o in overrides):
        return tuple(overrides)
    raise TargetConfigError("overrides: expected {'field.path': value, ...} or ['field.path=value', ...]")


def build_request(
    model: Any,
    target: Any,
    *,
    data: Any = None,
    checkpoint: str | Path | None = None,
    classes: Any = None,
    calibration: Any = None,
    input_shape: Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    test_images: int | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    device: str | None = None,
    ssh_options: SshOptions | None = None,
    runs_dir: str | Path = "runs",
    artifacts_dir: str | Path = "artifacts",
    force: bool = False,
    allow_budget_miss: bool = False,
    spelling: Spelling = PYTHON,
) -> DeployRequest:
    """The request for one deploy, as `edgeship deploy` and `deploy` below ask for it: the target checked, the
    model and its classes checked against each other (a model whose outputs are not the classes is refused
    here, before any stage), the data planned. An in-memory model is written once to runs/<target>/inputs/,
    named by its key (pipeline/models/memory.py); in-memory data is read into ImageSets named by fingerprint."""
    profile = load_target(target, overrides)
    if test_images is not None and (isinstance(test_images, bool) or not isinstance(test_images, int)
                                    or test_images < 1):  # fmt: skip
        raise UsageError(f"{spelling.test_images} must be at least 1")
    runs_dir = Path(runs_dir)
    spec, ckpt = _model(model, profile, runs_dir=runs_dir, data=data, checkpoint=checkpoint, classes=classes,
                        input_shape=input_shape, mean=mean, std=std, o=spelling)  # fmt: skip
    plan = _plan(spec, data, calibration, test_images)
    return DeployRequest(target=profile, spec=spec, checkpoint=ckpt, data=plan, runs_dir=runs_dir,
                         artifacts_dir=Path(artifacts_dir), force=force, allow_budget_miss=allow_budget_miss,
                         devices=device, ssh_options=ssh_options)  # fmt: skip


def _model(model: Any, profile: TargetProfile, *, runs_dir: Path, data: Any, checkpoint: Any, classes: Any,
           input_shape: Any, mean: Any, std: Any, o: Spelling) -> tuple[ModelSpec, Path | None]:  # fmt: skip
    from pipeline.models.classes import check_classes
    from pipeline.models.zoo import get_model_spec, user_model_spec

    if isinstance(model, str) and ":" not in model:
        if classes is not None:
            raise UsageError(f"{o.classes} is for your own model ({o.model}); built-in models name theirs")
        return get_model_spec(model), _path(checkpoint)
    if input_shape is None or mean is None or std is None:
        raise UsageError(f"a user model ({o.model}) also needs {o.shape}")
    if data is None:
        raise UsageError(o.needs_data)
    shape, mean, std = _shape(input_shape), _floats(mean, "mean"), _floats(std, "std")
    names, where, listed, listing = _class_names(classes, data, o)
    if isinstance(model, str):
        spec = user_model_spec(model, input_shape=shape, mean=mean, std=std, class_names=names)
        check_classes(spec, where=where, from_file=listed, option=o.classes_arg, listing=listing)
        return spec, _path(checkpoint)
    from pipeline.models.memory import memory_checkpoint, memory_spec

    if checkpoint is not None:
        raise UsageError("checkpoint= is for a model given by name; an nn.Module is deployed with the weights it holds")
    spec = memory_spec(model, input_shape=shape, mean=mean, std=std, class_names=names)
    check_classes(spec, where=where, from_file=listed, option=o.classes_arg, listing=listing)
    return spec, memory_checkpoint(spec, runs_dir / profile.name)


def _path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def _shape(value: Any) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"input_shape: expected (C, H, W) like (3, 32, 32), got {value!r}") from None
    if min(c, h, w) < 1 or c > 4 or max(h, w) > 8192:
        raise UsageError(f"input_shape: expected (C, H, W) with 1-4 channels and sides of 1-8192 pixels, got {value!r}")
    return c, h, w


def _floats(value: Any, name: str) -> tuple[float, ...]:
    try:
        return (float(value),) if isinstance(value, int | float) else tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{name}: expected a number or one per channel, in 0-1 pixel units, got {value!r}") from None


def _class_names(classes: Any, data: Any, o: Spelling) -> tuple[tuple[str, ...], str, bool, str]:
    """(names, where they come from, whether the user listed them, what lists them) for check_classes."""
    from pipeline.models.classes import read_classes_file

    if isinstance(classes, str | Path):
        return read_classes_file(Path(classes)), f"{o.classes} {classes}", True, "the file"
    if classes is not None:
        names = tuple(str(n) for n in classes)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UsageError(f"{o.classes}: names appear twice: {', '.join(dupes[:5])}")
        return names, o.classes, True, o.classes
    if isinstance(data, str | Path):
        train = Path(data) / "train"
        if (sharded := _shard_classes(Path(data), o)) is not None:
            return sharded
        if not train.is_dir():
            raise DatasetError(f"{train}: no such folder; {o.data_dir} needs DIR/train/<class>/ images")
        return tuple(sorted(p.name for p in train.iterdir() if p.is_dir())), str(train), False, "the file"
    from pipeline.data.dataset import dataset_classes

    first = data.get("train") if isinstance(data, Mapping) else data
    names = dataset_classes(first)
    if names is None:
        raise UsageError(f"{type(first).__name__} names no classes (no .classes); give {o.classes_arg}: the model's "
                         "class names in output order")  # fmt: skip
    return names, f"{type(first).__name__}.classes", False, "the file"


def _shard_classes(data: Path, o: Spelling) -> tuple[tuple[str, ...], str, bool, str] | None:
    """Tar shards (DIR/train/*.tar, DIR/train-*.tar) name their classes in classes.txt; None: not shards."""
    from pipeline.data.shards import CLASSES_FILE, find_shards, shard_classes

    train = data / "train"
    if not find_shards(data, "train") or (train.is_dir() and any(p.is_dir() for p in train.iterdir())):
        return None
    names = shard_classes(data)
    if names is None:
        raise UsageError(f"{data}: tar shards label samples by class index (<key>.cls); give {o.classes_arg} (the "
                         f"model's class names in output order) or put {CLASSES_FILE} beside the shards")  # fmt: skip
    return names, f"{data} ({CLASSES_FILE})", True, CLASSES_FILE


def _plan(spec: ModelSpec, data: Any, calibration: Any, test_limit: int | None) -> DataPlan:
    from pipeline.data.dataset import to_imageset
    from pipeline.data.sources import DataPlan

    cal_path = Path(calibration) if isinstance(calibration, str | Path) else None
    if data is None or isinstance(data, str | Path):
        sets: dict[str, ImageSet] = {}
        data_dir = None if data is None else Path(data)
    else:
        sets, data_dir = _memory_sets(spec, data), None
    if calibration is not None and cal_path is None:
        sets["calibration_set"] = to_imageset(calibration, spec, split="calibration", labelled=False)
    elif calibration is None and "train_set" in sets:
        sets["calibration_set"] = sets["train_set"]  # int8 calibrates on training images unless told otherwise
    plan = DataPlan(spec, data_dir=data_dir, calibration_path=cal_path, test_limit=test_limit, **sets)
    plan.check()  # a missing split (calibration included) is reported now, before any stage runs
    return plan


def _memory_sets(spec: ModelSpec, data: Any) -> dict[str, ImageSet]:
    from pipeline.data.dataset import is_dataset, to_imageset
    from pipeline.data.imageset import ImageSet
    from pipeline.data.sources import split_validation

    if isinstance(data, Mapping):
        keys = sorted(str(k) for k in data)
        if not {"train", "test"} <= set(keys) <= {"train", "val", "test"}:
            raise DatasetError(f"data: a mapping needs 'train' and 'test' sets ('val' too, else it is carved from "
                               f"train), got keys {keys}")  # fmt: skip
        return {f"{k}_set": to_imageset(v, spec, split=k) for k, v in data.items()}
    if not is_dataset(data):
        raise DatasetError(f"data: expected an image folder, a Dataset of (image, label) or {{'train': ..., 'test': "
                           f"...}}, got {type(data).__name__}")  # fmt: skip
    whole = to_imageset(data, spec, split="all")
    train, test = split_validation(whole, fraction=TEST_FRACTION, max_images=TEST_MAX, seed=TEST_SEED)
    return {
        "train_set": ImageSet(train.images, train.labels, train.class_names, f"{whole.source} [train: {len(train)}]"),
        "test_set": ImageSet(test.images, test.labels, test.class_names, f"{whole.source} [test: {len(test)}]"),
    }


def stage_line(name: str, rec: StageRecord) -> str:
    """One progress line, as `edgeship deploy` prints it."""
    state = "up to date" if rec.skipped else f"done in {rec.seconds:.1f} s"
    return f"  [{name:<17}] {state}"


def printing_progress(stream: IO[str] | None = None) -> Progress:
    """A Progress callback printing `stage_line` to `stream` (default: sys.stderr at the time of the call)."""

    def on_stage(name: str, rec: StageRecord) -> None:
        print(stage_line(name, rec), file=stream or sys.stderr)

    return on_stage


def deploy(
    model: Any,
    target: str | Path | TargetProfile,
    *,
    data: Any = None,
    calibration: Any = None,
    input_shape: Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    classes: Sequence[str] | str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    device: str | None = None,
    runs_dir: str | Path = "runs",
    artifacts_dir: str | Path = "artifacts",
    progress: Progress | bool | None = None,
    force: bool = False,
    allow_budget_miss: bool = False,
    test_images: int | None = None,
    checkpoint: str | Path | None = None,
    ssh_options: SshOptions | None = None,
) -> DeployResult:
    """Prune, fine-tune, convert, verify, profile and publish `model` for `target`; what `edgeship deploy` does.

    model: an nn.Module (deployed with the weights it holds now), "package.module:factory" (with `checkpoint`),
        or a built-in name (fmnist_cnn, efficientnet_lite0).
    target: a name (rpi, host, ...), a YAML path or a TargetProfile; `overrides` as in `load_target`.
    data: an image folder DIR (DIR/train/<class>/, DIR/test/<class>/), a Dataset of (image, label), or
        {"train": ..., "test": ..., "val": ...} of them (no "val": carved from train; a single Dataset: a seeded
        fifth of each class is the test set). Images: uint8 HWC arrays, PIL images, or CHW/HWC tensors of 0-1
        floats or uint8, the size of `input_shape`. None: the built-in model's own data.
    calibration: int8 calibration images: a .npz or folder path, or a Dataset (default: DIR/calibration/ for a
        folder, the training images for a Dataset).
    input_shape, mean, std: (C, H, W) and per-channel normalization in 0-1 pixel units, for your own model.
    classes: the class names in output order (a list, or a file with one per line); default: the folder names
        or the Dataset's `.classes`.
    device: where to profile, as DEVICE: "user@host[:port]", "adb:SERIAL", "local", or several "a,b".
    progress: called as progress(stage_name, record) after each stage; True prints the CLI's lines to stderr.
    Raises the package's errors (pipeline.errors), e.g. BudgetError when a budget is missed (nothing published
    unless allow_budget_miss). A script started by torchrun fine-tunes on every rank (DDP); rank 0 runs the
    rest and returns the result, the other ranks return None (README, "Fine-tuning at scale").
    """
    from pipeline.deploy import deploy as run_chain

    req = build_request(model, target, data=data, checkpoint=checkpoint, classes=classes, calibration=calibration,
                        input_shape=input_shape, mean=mean, std=std, test_images=test_images, overrides=overrides,
                        device=device, ssh_options=ssh_options, runs_dir=runs_dir, artifacts_dir=artifacts_dir,
                        force=force, allow_budget_miss=allow_budget_miss)  # fmt: skip
    from pipeline.train.ddp import distributed_deploy

    on_stage = printing_progress() if progress is True else (progress or None)
    return distributed_deploy(req, lambda: run_chain(req, on_stage))  # under torchrun: None on ranks but 0


def record_path(t: TargetProfile, runs_dir: str | Path) -> Path:
    """Where every device's figures for target `t` are kept (beside the run, not inside the bundle)."""
    from pipeline.devices.record import FILE_NAME

    return Path(runs_dir) / t.name / FILE_NAME


def profile_files(t: TargetProfile, files: Sequence[Path], devices: str | None, *, runs_dir: str | Path,
                  ssh_options: SshOptions | None = None) -> dict[str, DeviceRun]:  # fmt: skip
    """Profile `files` on `devices` (DEVICE; None: the profile's transport) and record every device's figures
    (pipeline/devices/record.py); DevicesFailed, with every device's outcome, when any of them failed."""
    from pipeline.bench import bench_settings
    from pipeline.devices import from_profile, parse_devices
    from pipeline.devices.record import profile_and_record

    for f in files:
        if not f.is_file():
            raise UsageError(f"{f}: no such model; run `make deploy TARGET={t.name}` first or give --model-file")
    specs = parse_devices(devices, t.transport) if devices else (from_profile(t.transport, target=t.name),)
    names = {f"{i}:{f.name}" if len(files) > 1 else f.name: f for i, f in enumerate(files)}
    return profile_and_record(names, bench_settings(t, on_host=False), specs, record=record_path(t, runs_dir),
                              ssh_options=ssh_options)  # fmt: skip


def profile(
    bundle: DeployResult | str | Path | Sequence[str | Path],
    devices: str | None = None,
    *,
    target: str | Path | TargetProfile | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    runs_dir: str | Path = "runs",
    ssh_options: SshOptions | None = None,
) -> dict[str, DeviceRun]:
    """Profile a deployed bundle's model.tflite (or .tflite files) on `devices`, as `edgeship profile` does.

    The profiling settings and the default transport come from `target`, else from the profile the bundle was
    deployed with (its manifest). Returns {device: DeviceRun}; figures are kept in runs/<target>/
    profile-devices.json. Raises DevicesFailed (`.runs`: every device's outcome) when a device failed."""
    files, bundle_dir = _model_files(bundle)
    if target is not None:
        t = load_target(target, overrides)
    elif bundle_dir is not None:
        t = bundle_profile(bundle_dir, overrides)
    else:
        raise UsageError("profile: give target= (the profile with the profiling settings) for .tflite files")
    return profile_files(t, files, devices, runs_dir=runs_dir, ssh_options=ssh_options)


def _model_files(bundle: Any) -> tuple[list[Path], Path | None]:
    """(the .tflite files to profile, the bundle folder they are in or None)."""
    if isinstance(bundle, DeployResult | str | Path):
        where = _bundle_dir(bundle)
        return ([where / "model.tflite"], where) if where.is_dir() else ([where], None)
    if isinstance(bundle, Sequence) and all(isinstance(b, str | Path) for b in bundle) and bundle:
        return [Path(b) for b in bundle], None
    raise UsageError(f"bundle: expected a DeployResult, a bundle folder or .tflite paths, got {type(bundle).__name__}")


def _bundle_dir(bundle: Any) -> Path:
    if isinstance(bundle, DeployResult):
        if bundle.bundle is None:
            raise UsageError("this deploy published no bundle; deploy again (within its budgets) first")
        return bundle.bundle
    if isinstance(bundle, str | Path):
        return Path(bundle)
    raise UsageError(f"bundle: expected a DeployResult or a bundle folder, got {type(bundle).__name__}")


def bundle_profile(bundle_dir: Path, overrides: Mapping[str, Any] | Sequence[str] | None = None) -> TargetProfile:
    """The target profile a bundle was deployed with, from its manifest (overrides applied)."""
    from pipeline.targets import validate_profile

    path = bundle_dir / "manifest.json"
    try:
        dump = json.loads(path.read_text(encoding="utf-8"))["summary"]["profile"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: no readable bundle manifest with its profile ({exc}); deploy first, or give "
                         "target=") from None  # fmt: skip
    if not isinstance(dump, dict):
        raise UsageError(f"{path}: the manifest's profile is not a mapping; deploy again, or give target=")
    return validate_profile(dump, path, override_items(overrides))


def ship(
    bundle: DeployResult | str | Path,
    app: str | Path,
    *,
    name: str | None = None,
    force: bool = False,
    resources: str | Path | None = None,
    version: str | None = None,
) -> ShipResult:
    """Copy a bundle into an Android (Gradle) or iOS (Xcode) app, as `edgeship ship` does: checked against its
    manifest, metadata embedded, versioned (a newer model in the app is kept unless `force`), swapped atomically.
    `name`: the model's folder in the app (default: from the bundle); `resources`: iOS resources folder."""
    from pipeline.ship.api import default_model_name, phone_note
    from pipeline.ship.api import ship as copy_into_app

    bundle_dir = _bundle_dir(bundle)
    if not (bundle_dir / "manifest.json").is_file():
        raise ShipError(f"{bundle_dir}: no published bundle (no manifest.json); deploy first")
    result = copy_into_app(bundle_dir, Path(app), model_name=name or default_model_name(bundle_dir), force=force,
                           resources=_path(resources), version=version)  # fmt: skip
    note = phone_note(bundle_profile(bundle_dir))
    return replace(result, note=note) if note else result
