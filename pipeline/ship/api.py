"""`ship`: copy a finished bundle into an Android or iOS app, checked, versioned and atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import json_text
from pipeline.errors import ShipError
from pipeline.ship.check import check_same_outputs, io_details
from pipeline.ship.copy import ship_files
from pipeline.ship.detect import AppKind, check_model_name, detect_app, model_destination
from pipeline.ship.embed import EDGESHIP_METADATA, TFLITE_METADATA, embed_metadata
from pipeline.ship.metadata import app_metadata
from pipeline.ship.version import bundle_version, check_not_older, parse_version

if TYPE_CHECKING:
    from pipeline.targets import TargetProfile

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "edgeship-bundle/1"
SHIP_FORMAT = "edgeship-ship/1"


@dataclass(frozen=True)
class ShipResult:
    app_kind: AppKind
    destination: Path
    version: str
    replaced_version: str | None  # the version that was there before, if any
    files: dict[str, str]  # name -> sha256 of what is now in the app
    embedded: bool  # TFLITE_METADATA + edgeship_metadata + packed labels are inside model.tflite
    note: str | None = None  # something the user should know (e.g. the bundle was made for a board, not a phone)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(obj: Any) -> bytes:
    return json_text(obj).encode("utf-8")


def read_bundle(bundle_dir: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The bundle manifest and the bytes of the files an app needs, each checked against the manifest."""
    path = bundle_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShipError(f"{path}: not a readable bundle manifest ({exc}); run `make deploy` first") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ShipError(f"{path}: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}")
    data = {}
    for name in ("model.tflite", "labels.txt", "metadata.json"):
        entry = manifest.get("files", {}).get(name)
        if entry is None:
            raise ShipError(f"{path} lists no {name}; the bundle is incomplete, deploy again")
        blob = (bundle_dir / name).read_bytes()
        if _sha256(blob) != entry["sha256"]:
            raise ShipError(f"{bundle_dir / name} does not match its sha256 in {path}; the bundle was changed")
        data[name] = blob
    return manifest, data


def _existing_version(dest: Path) -> str | None:
    meta = dest / "metadata.json"
    if not meta.is_file():
        return None
    try:
        return str(json.loads(meta.read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ShipError(
            f"{meta} has no readable version; cannot tell whether this bundle is newer (pass FORCE=1 to make "
            "ship, or --force, to replace it)"
        ) from None


def ship(
    bundle_dir: Path,
    app_dir: Path,
    *,
    model_name: str,
    force: bool = False,
    resources: Path | None = None,
    version: str | None = None,
    embed: bool = True,
) -> ShipResult:
    """Copy the bundle's model, labels, metadata and manifest into the app at `app_dir`.

    Android: `app/src/main/assets/<model_name>/`; iOS: `<App>/Resources/<model_name>/` (or `resources`,
    relative to the app). `version` defaults to the bundle's build time; an app that holds a newer version is
    left alone unless `force`. With `embed`, model.tflite carries its metadata (TFLITE_METADATA for Android's
    TFLite Support library, edgeship_metadata as JSON) and labels.txt packed in, checked to compute exactly
    what the bundle's model computes.
    """
    check_model_name(model_name)
    layout = detect_app(app_dir, resources=resources)
    dest = model_destination(layout, model_name)
    manifest, src = read_bundle(bundle_dir)
    version = version or bundle_version(manifest, bundle_dir / "manifest.json")
    parse_version(version)
    existing = _existing_version(dest)
    check_not_older(version, existing, where=dest, force=force)

    io = io_details(src["model.tflite"])
    meta = app_metadata(json.loads(src["metadata.json"]), io, version=version,
                        bundle_sha256=manifest["files"]["model.tflite"]["sha256"])  # fmt: skip
    model = src["model.tflite"]
    if embed:
        model = embed_metadata(model, meta, labels=src["labels.txt"])
        check_same_outputs(src["model.tflite"], model)
    meta = {
        **meta,
        "sha256": _sha256(model),
        "embedded": [TFLITE_METADATA, EDGESHIP_METADATA, "labels.txt (packed)"] if embed else [],
    }
    files = {"model.tflite": model, "labels.txt": src["labels.txt"], "metadata.json": _json(meta)}
    app_manifest = {
        "format": SHIP_FORMAT,
        "version": version,
        "files": {n: {"sha256": _sha256(b), "bytes": len(b)} for n, b in files.items()},
        "bundle": {"files": manifest["files"], "summary": manifest.get("summary", {})},
    }
    files["manifest.json"] = _json(app_manifest)
    # what is staged must be what the bundle manifest recorded (labels; the model when not embedded) or what
    # was derived from it in memory and checked above (the embedded model, metadata, manifest)
    expected = {n: _sha256(b) for n, b in files.items()}
    expected["labels.txt"] = manifest["files"]["labels.txt"]["sha256"]
    if not embed:
        expected["model.tflite"] = manifest["files"]["model.tflite"]["sha256"]
    shipped = ship_files(files, dest, expected_sha256=expected)
    log.info("shipped %s version %s to %s (%s app)", meta["model"], version, dest, layout.kind)
    return ShipResult(layout.kind, dest, version, existing, shipped, embed)


def default_model_name(bundle_dir: Path) -> str:
    """The bundle's model name as a plain folder name (`fmnist_cnn`; `mypkg.nets:make_net` -> `mypkg.nets-make_net`)."""
    try:
        name = str(json.loads((bundle_dir / "metadata.json").read_text(encoding="utf-8"))["model"])
    except (OSError, ValueError, KeyError) as exc:
        raise ShipError(f"{bundle_dir / 'metadata.json'}: no model name ({exc}); give the model name") from None
    return check_model_name(re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:64] or "model")


def ship_target(
    target: str,
    app_dir: Path,
    *,
    artifacts_dir: Path = Path("artifacts"),
    model_name: str | None = None,
    force: bool = False,
    resources: Path | None = None,
    version: str | None = None,
) -> ShipResult:
    """`ship` the published bundle of `target` (a name, an alias such as rpi, or a profile path)."""
    from pipeline.targets import load_target

    profile = load_target(target)
    bundle_dir = artifacts_dir / profile.name
    if not (bundle_dir / "manifest.json").is_file():
        raise ShipError(f"{bundle_dir}: no published bundle; run `make deploy TARGET={target}` first")
    name = model_name or default_model_name(bundle_dir)
    result = ship(bundle_dir, app_dir, model_name=name, force=force, resources=resources, version=version)
    note = phone_note(profile)
    return replace(result, note=note) if note else result


def phone_note(profile: TargetProfile) -> str | None:
    """What to know when a bundle made for a board goes into a phone app (None for a phone's bundle)."""
    if profile.transport.kind == "adb":  # the phone profiles reach their device over adb; boards over ssh
        return None
    return (
        f"this bundle was made for {profile.name} ({profile.description or profile.hardware.cpu}), not for a "
        f"phone: its pruning, precision and latency figures fit that device. For a phone app, deploy "
        f"TARGET=android and ship that bundle."
    )
