"""An emulated Raspberry Pi for tests: an arm64 Debian bookworm root filesystem run through qemu-user (binfmt_misc).

Built once (~1 min, ~330 MB, no arm64 code runs while building) and cached in $EDGESHIP_ROOTFS or
/var/cache/edgeship-test-rootfs: `debootstrap --foreign --variant=minbase` downloads the packages, every .deb is
unpacked with `dpkg-deb -x`, and tflite-runtime 2.14 with numpy<2 (aarch64 wheels) is installed with pip's
`--platform` into /opt/pylib. Functional only: emulated code is ~100x slower than the host; never time it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

RECIPE = "edgeship-rootfs v1: bookworm arm64 minbase + python3 libstdc++6; tflite-runtime==2.14.0 numpy<2"
MIRROR = os.environ.get("EDGESHIP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
WHEELS = ("tflite-runtime==2.14.0", "numpy<2")


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESHIP_ROOTFS", "/var/cache/edgeship-test-rootfs"))


def missing_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, binfmt_misc, chroot)"
    for tool, package in (("debootstrap", "debootstrap"), ("dpkg-deb", "dpkg"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} missing: run .ci/setup_devices.sh (apt-get install {package})"
    if not BINFMT_CONF.is_file() or shutil.which("qemu-aarch64-static") is None:
        return "qemu-user-static missing: run .ci/setup_devices.sh (apt-get install qemu-user-static)"
    return None


def _mirror_reachable() -> str | None:
    try:
        with urllib.request.urlopen(f"{MIRROR}/dists/bookworm/Release", timeout=15) as r:
            r.read(64)
    except OSError as exc:
        return f"the Debian mirror {MIRROR} is unreachable ({exc}); set EDGESHIP_DEBIAN_MIRROR"
    return None


def _run(argv: list[str], timeout: int) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")


def build_rootfs(dest: Path, recipe: str, *, debootstrap: list[str], pip_platform: list[str],
                 wheels: tuple[str, ...]) -> tuple[Path | None, str]:  # fmt: skip
    """(rootfs, how) with how 'cached' or 'built in N s'; (None, reason) when it cannot be built here.

    `debootstrap --foreign --variant=minbase` with the extra `debootstrap` arguments (arch, packages, suite),
    every .deb unpacked with `dpkg-deb -x`, then `wheels` installed for the device's Python with pip's
    `pip_platform` options into /opt/pylib (a .pth file puts it on the device's path). Built beside `dest`
    and renamed into place; `recipe` marks a finished rootfs."""
    import time

    marker = dest / ".edgeship-rootfs"
    if marker.is_file() and marker.read_text() == recipe:
        return dest, "cached"
    reason = _mirror_reachable()
    if reason:
        return None, reason
    start = time.monotonic()
    tmp = dest.with_name(dest.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        suite_args = [*debootstrap[:-1], "--foreign", "--variant=minbase", debootstrap[-1]]
        _run(["debootstrap", *suite_args, str(tmp), MIRROR], timeout=600)
        for deb in sorted((tmp / "var/cache/apt/archives").glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(tmp)], timeout=120)
        for name in ("passwd", "group"):
            shutil.copyfile(tmp / f"usr/share/base-passwd/{name}.master", tmp / f"etc/{name}")
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
              *pip_platform, "--target", str(tmp / "opt/pylib"), *wheels], timeout=600)  # fmt: skip
        (tmp / "usr/lib/python3/dist-packages").mkdir(parents=True, exist_ok=True)
        (tmp / "usr/lib/python3/dist-packages/edgeship-pylib.pth").write_text("/opt/pylib\n")
        for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()  # the packages, already unpacked
        (tmp / ".edgeship-rootfs").write_text(recipe)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest, f"built in {time.monotonic() - start:.0f} s"


def ensure_rootfs() -> tuple[Path | None, str]:
    """The arm64 bookworm rootfs (see build_rootfs)."""
    return build_rootfs(
        cache_dir(), RECIPE, debootstrap=["--arch=arm64", "--include=python3,libstdc++6", "bookworm"],
        pip_platform=["--platform", "manylinux_2_34_aarch64", "--platform", "manylinux2014_aarch64",
                      "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"],
        wheels=WHEELS,
    )  # fmt: skip


@contextlib.contextmanager
def binfmt_aarch64() -> Iterator[None]:
    """Make the kernel run aarch64 ELF files through qemu (F flag: works inside a chroot); undo only what this did."""
    mounted = registered = False
    if not (BINFMT / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], timeout=30)
        mounted = True
    if not (BINFMT / "qemu-aarch64").exists():
        (BINFMT / "register").write_text(BINFMT_CONF.read_text().strip())
        registered = True
    try:
        yield
    finally:
        if registered:
            with contextlib.suppress(OSError):
                (BINFMT / "qemu-aarch64").write_text("-1")
        if mounted:
            subprocess.run(["umount", str(BINFMT)], capture_output=True, timeout=30, check=False)


# sshd in a private mount namespace with proc, sys and dev bound into the rootfs (gone with the namespace).
CHROOT_WRAP = (
    'root="$1"; shift; mount --bind /proc "$root/proc" && mount --bind /sys "$root/sys" && '
    'mount --rbind /dev "$root/dev" && exec "$@"'
)


def chroot_wrap(rootfs: Path) -> list[str]:
    """An argv prefix that runs a command (sshd) with proc/sys/dev mounted in `rootfs`, privately."""
    return ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", CHROOT_WRAP, "sh", str(rootfs)]
