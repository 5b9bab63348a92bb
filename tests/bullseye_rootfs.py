"""Real old Pythons for the device runner: Debian bullseye's CPython 3.9 (and 2.7), in a chroot on this machine.

Devices run older Pythons than the pipeline; the runner must work on 3.9 and the probe must refuse 2.7 with
its version. Debian bullseye ships python3.9 (3.9.2) and python2.7: an x86-64 bullseye root filesystem run
with `chroot` needs no emulation. Built like the emulated Pi (tests/qemu_rootfs.py), once (~20 s, ~240 MB),
cached in $EDGESHIP_BULLSEYE_ROOTFS or /var/cache/edgeship-test-bullseye: `debootstrap --foreign
--variant=minbase`, every .deb unpacked with `dpkg-deb -x`, and the device side's pip install (tflite-runtime
2.14 and numpy<2, cp39 wheels) done from here with pip's `--platform` into /opt/pylib. Root only.

Use from a test module with `pytest_plugins = ("bullseye_rootfs",)` and the `bullseye` fixture: a
`ChrootTransport` (a LocalTransport whose commands run inside the rootfs, /proc bound in a private mount
namespace) whose `python` is bullseye's /usr/bin/python3.9.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from qemu_rootfs import build_rootfs

from pipeline.devices.transport import Completed, LocalTransport, run_process, text

RECIPE = "edgeship-bullseye v1: bullseye amd64 minbase + python3 python2.7; tflite-runtime==2.14.0 numpy<2 (cp39)"
WHEELS = ("tflite-runtime==2.14.0", "numpy<2")
PYTHON39 = "/usr/bin/python3.9"
PYTHON27 = "/usr/bin/python2.7"
# /proc bound into the rootfs in a private mount namespace (gone with the command), then chroot.
WRAP = 'root="$1"; shift; mount --bind /proc "$root/proc" && exec chroot "$root" "$@"'


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESHIP_BULLSEYE_ROOTFS", "/var/cache/edgeship-test-bullseye"))


def missing_reason() -> str | None:
    if platform.machine() != "x86_64":
        return f"the bullseye rootfs is x86-64 (no emulation); this machine is {platform.machine()}"
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mount)"
    for tool, package in (("debootstrap", "debootstrap"), ("dpkg-deb", "dpkg"), ("unshare", "util-linux"),
                          ("chroot", "coreutils")):  # fmt: skip
        if shutil.which(tool) is None:
            return f"{tool} missing: run .ci/setup_devices.sh (apt-get install {package})"
    return None


def ensure_rootfs() -> tuple[Path | None, str]:
    """The amd64 bullseye rootfs (qemu_rootfs.build_rootfs)."""
    return build_rootfs(
        cache_dir(), RECIPE, debootstrap=["--arch=amd64", "--include=python3,python2.7", "bullseye"],
        pip_platform=["--platform", "manylinux2014_x86_64", "--python-version", "3.9", "--implementation", "cp",
                      "--abi", "cp39"],
        wheels=WHEELS,
    )  # fmt: skip


class ChrootTransport(LocalTransport):
    """This machine, as a device whose userland is the bullseye rootfs: every command runs chrooted there and
    device paths are paths inside it."""

    def __init__(self, rootfs: Path, *, python: str = PYTHON39, workdir: str = "/tmp/edgeship") -> None:
        super().__init__(python=python, workdir=workdir)
        self.rootfs = rootfs

    def host_path(self, remote: str) -> Path:
        return self.rootfs / remote.lstrip("/")

    def run(self, argv: Sequence[str], *, timeout_s: float, stdin: bytes | None = None) -> Completed:
        wrapped = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", WRAP, "sh", str(self.rootfs),
                   *argv]  # fmt: skip
        proc = run_process(wrapped, timeout_s=timeout_s, stdin=stdin, what=f"running {argv[0]} in {self.describe()}")
        return Completed(tuple(argv), proc.returncode, text(proc.stdout), text(proc.stderr))

    def push(self, local: Path, remote: str, *, timeout_s: float = 120.0) -> None:
        super().push(local, str(self.host_path(remote)), timeout_s=timeout_s)

    def pull(self, remote: str, local: Path, *, timeout_s: float = 120.0) -> None:
        super().push(self.host_path(remote), str(local), timeout_s=timeout_s)

    def describe(self) -> str:
        return f"a Debian bullseye chroot ({self.rootfs})"


@pytest.fixture(scope="session")
def bullseye() -> ChrootTransport:
    """A transport into the bullseye rootfs, its python 3.9 checked to run; skips with the reason otherwise."""
    reason = missing_reason()
    if reason:
        pytest.skip(f"no Debian bullseye rootfs (real Python 3.9 and 2.7): {reason}")
    rootfs, how = ensure_rootfs()
    if rootfs is None:
        pytest.skip(f"no Debian bullseye rootfs (real Python 3.9 and 2.7): {how}")
    t = ChrootTransport(rootfs)
    done = t.run([PYTHON39, "-c", "import sys; print(sys.version_info[:2])"], timeout_s=60)
    assert done.rc == 0 and done.stdout.strip() == "(3, 9)", f"the bullseye rootfs ({how}) is broken: {done}"
    return t


def run_chrooted(rootfs: Path, argv: Sequence[str], *, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run argv inside the rootfs (for tests that want the plain process, not a transport)."""
    wrapped = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", WRAP, "sh", str(rootfs), *argv]
    return subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout_s, check=False)
