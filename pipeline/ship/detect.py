"""Which kind of app a folder is, where a model goes inside it, and that the place stays inside the app.

- Android (Gradle): `settings.gradle(.kts)` or `app/build.gradle(.kts)` -> `app/src/main/assets/<model-name>/`
  (the `app` module's assets, packed into the APK and opened with `context.assets`).
- iOS (Xcode): one `*.xcodeproj` -> `<App>/Resources/<model-name>/`, `<App>` being the folder beside the
  project that has its name (Xcode's default layout), or the resources folder the user names.

Every destination is resolved (symlinks followed, `..` removed) and must lie inside the app folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import ShipError

AppKind = Literal["android", "ios"]
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GRADLE_SETTINGS = ("settings.gradle", "settings.gradle.kts")
GRADLE_APP = ("app/build.gradle", "app/build.gradle.kts")


@dataclass(frozen=True)
class AppLayout:
    kind: AppKind
    root: Path  # the app folder, resolved
    resources: Path  # where model folders go, resolved, inside root
    marker: str  # the file that told the kind, relative to root


def check_model_name(name: str) -> str:
    """A model name is one plain folder name: letters, digits, `.`, `_`, `-`; no separators, no `..`."""
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise ShipError(
            f"model name {name!r} is not a plain folder name: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', '\\' or '..')"
        )
    return name


def inside(root: Path, path: Path, *, what: str) -> Path:
    """`path` resolved (symlinks followed, `..` gone), refused unless it lies within `root` (resolved)."""
    real_root = root.resolve()
    real = (real_root / path).resolve() if not path.is_absolute() else path.resolve()
    if real != real_root and not real.is_relative_to(real_root):
        raise ShipError(
            f"{what} {path} resolves to {real}, outside the app folder {real_root} (a symlink or '..' leads out); "
            "ship only into the app itself"
        )
    return real


def _android(root: Path) -> str | None:
    for marker in (*GRADLE_APP, *GRADLE_SETTINGS):
        if (root / marker).is_file():
            return marker
    return None


def _xcodeprojs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.xcodeproj") if p.is_dir())


def detect_app(app_dir: Path, *, resources: Path | None = None) -> AppLayout:
    """The app kind of `app_dir` and its resources folder (`resources`, relative to the app, overrides it)."""
    if not app_dir.is_dir():
        raise ShipError(f"{app_dir}: no such app folder")
    root = app_dir.resolve()
    gradle = _android(root)
    projects = _xcodeprojs(root)
    if gradle and projects:
        raise ShipError(
            f"{app_dir} has both a Gradle build ({gradle}) and an Xcode project ({projects[0].name}); "
            "give the Android or the iOS app folder itself"
        )
    if gradle:
        if resources is None and not (root / "app").is_dir():
            raise ShipError(
                f"{app_dir}: Gradle project ({gradle}) without an `app` module folder; name the assets folder "
                "to ship into (e.g. mymodule/src/main/assets)"
            )
        default = Path("app/src/main/assets")
        return AppLayout("android", root, inside(root, resources or default, what="assets folder"), gradle)
    if projects:
        if resources is None:
            if len(projects) > 1:
                names = ", ".join(p.name for p in projects)
                raise ShipError(
                    f"{app_dir} has several Xcode projects ({names}); name the resources folder with "
                    "RESOURCES=path/inside/the/app (--resources)"
                )
            app_folder = root / projects[0].stem
            if not app_folder.is_dir():
                raise ShipError(
                    f"{app_dir}: Xcode project {projects[0].name} but no folder {projects[0].stem}/ beside it; "
                    "name the resources folder to ship into with RESOURCES=MyApp/Resources (--resources)"
                )
            resources = app_folder.relative_to(root) / "Resources"
        marker = projects[0].name
        return AppLayout("ios", root, inside(root, resources, what="resources folder"), marker)
    raise ShipError(
        f"{app_dir} is neither an Android Gradle project (looked for {', '.join(GRADLE_SETTINGS + GRADLE_APP)}) "
        "nor an iOS Xcode project (looked for *.xcodeproj); give the app's root folder"
    )


def model_destination(layout: AppLayout, model_name: str) -> Path:
    """`<resources>/<model_name>`, resolved and checked to stay inside the app (an existing symlink too)."""
    check_model_name(model_name)
    return inside(layout.root, layout.resources / model_name, what="model folder")
