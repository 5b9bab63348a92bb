"""The device path on this machine (LocalTransport), and the runner on real old Pythons: devices run older Pythons
than the pipeline, so the runner must work on 3.9 and the probe must answer (and refuse) on 2.7.

The old Pythons are Debian bullseye's own CPython 3.9.2 and 2.7.18 in a chroot (tests/bullseye_rootfs.py; root
only, as in CI), and, where pyenv is installed, pyenv's 2.7 and 3.7 as well.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pipeline.bench import BenchSettings
from pipeline.devices.profile_device import profile_on_device
from pipeline.devices.transport import LocalTransport
from pipeline.errors import DeviceError

pytest_plugins = ("devices_fixtures", "bullseye_rootfs")

PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"


def _pyenv(prefix: str) -> Path | None:
    found = sorted(PYENV.glob(f"{prefix}.*/bin/python"))
    return found[-1] if found else None


def test_local_transport_profiles_pinned_and_cleans_up(tmp_path: Path, tiny_tflite_file: Path) -> None:
    t = LocalTransport(python=sys.executable, workdir=str(tmp_path / "work"))
    r = profile_on_device(tiny_tflite_file, BenchSettings(threads=1, warmup=1, runs=10), t, cpus=(0,), timeout_s=120)
    assert r["runs"] == 10 and r["pinned_cpus"] == [0] and r["device"]["transport"] == "local"
    assert r["device"]["machine"] == os.uname().machine and r["device"]["runtime"] == "ai-edge-litert"
    assert os.listdir(tmp_path / "work") == []


@pytest.mark.parametrize("version", ["2.7", "3.7"])
def test_old_pythons_are_refused_with_the_version(version: str, tmp_path: Path, tiny_tflite_file: Path) -> None:
    python = _pyenv(version)
    if python is None:
        pytest.skip(f"no Python {version} under {PYENV} to probe")
    t = LocalTransport(python=str(python), workdir=str(tmp_path / "work"))
    with pytest.raises(DeviceError, match=rf"has Python {version}\.\d+; the runner needs 3.9 or newer"):
        profile_on_device(tiny_tflite_file, BenchSettings(threads=1, warmup=0, runs=1), t, timeout_s=60)


def test_runner_profiles_on_debian_bullseye_python39(bullseye, tiny_tflite_file: Path) -> None:
    """The whole device path on a real CPython 3.9 (bullseye's /usr/bin/python3.9) with the device-side install
    the README gives for older boards (tflite-runtime, numpy<2): probe, runner, figures, clean-up."""
    r = profile_on_device(tiny_tflite_file, BenchSettings(threads=1, warmup=2, runs=20), bullseye, cpus=(0,),
                          timeout_s=120)  # fmt: skip
    assert r["python"].startswith("3.9.") and r["device"]["python"] == r["python"], r["device"]
    assert r["device"]["runtime"] == "tflite-runtime" and r["device"]["runtime_version"] == "2.14.0"
    assert r["runtime"] == "tflite-runtime" and r["runs"] == 20 and r["pinned_cpus"] == [0]
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"] and len(r["quantiles_ms"]) == 21
    assert r["input"] == {"shape": [1, 8, 8, 3], "dtype": "float32"} and r["peak_rss_kib"] > 0
    assert os.listdir(bullseye.host_path(bullseye.workdir)) == []  # its run folder was removed


def test_python27_on_debian_bullseye_is_refused_with_the_version(bullseye, tiny_tflite_file: Path) -> None:
    """The probe runs on a real 2.7 and the device is refused with its version (not a SyntaxError, not a hang)."""
    from bullseye_rootfs import PYTHON27, ChrootTransport

    t = ChrootTransport(bullseye.rootfs, python=PYTHON27)
    with pytest.raises(DeviceError, match=r"has Python 2\.7\.\d+; the runner needs 3.9 or newer"):
        profile_on_device(tiny_tflite_file, BenchSettings(threads=1, warmup=0, runs=1), t, timeout_s=60)
