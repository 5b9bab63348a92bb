"""Model versions and the rule that an app never silently gets an older model than it has.

A version is either a UTC build timestamp `YYYY-MM-DDTHH:MM:SSZ` (the default: the bundle's build time, so
every deploy is newer than the one before without anyone counting) or a semantic version `MAJOR.MINOR.PATCH`
that the user gives. Timestamps order by time, semantic versions by their three numbers; a timestamp and a
semantic version cannot be ordered, so replacing one kind by the other needs `force` like a downgrade does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ShipError

SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class ModelVersion:
    kind: Literal["timestamp", "semver"]
    key: tuple[int, ...]
    text: str


def parse_version(text: str) -> ModelVersion:
    if m := SEMVER.fullmatch(text):
        return ModelVersion("semver", tuple(int(g) for g in m.groups()), text)
    try:
        when = datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise ShipError(
            f"version {text!r} is neither a UTC timestamp like 2026-01-31T12:00:00Z nor MAJOR.MINOR.PATCH"
        ) from None
    return ModelVersion("timestamp", (int(when.timestamp()),), text)


def timestamp_version(when: datetime) -> str:
    return when.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def bundle_version(manifest: Mapping[str, Any], manifest_path: Path) -> str:
    """The bundle's build time: its manifest's `created` field when it has one, else the manifest's mtime."""
    created = manifest.get("created") or manifest.get("summary", {}).get("created")
    if created:
        return timestamp_version(datetime.fromisoformat(str(created).replace("Z", "+00:00")))
    return timestamp_version(datetime.fromtimestamp(manifest_path.stat().st_mtime, tz=UTC))


def check_not_older(new: str, existing: str | None, *, where: Path, force: bool) -> None:
    """Refuse to replace the model at `where` (version `existing`) with an older or unordered one unless forced."""
    if existing is None or force:
        return
    a, b = parse_version(new), parse_version(existing)
    if a.kind != b.kind:
        raise ShipError(
            f"{where} holds version {existing} ({b.kind}) and this bundle is {new} ({a.kind}): the two cannot be "
            "ordered; pass FORCE=1 (make ship) or --force to replace it anyway"
        )
    if a.key < b.key:
        raise ShipError(
            f"{where} holds version {existing}, newer than this bundle's {new}; refusing to downgrade the app's "
            "model (pass FORCE=1 to make ship, or --force, to replace it anyway)"
        )
