"""The device path on this machine (LocalTransport), and the probe against real old Pythons where pyenv has them:
devices run older Pythons than the pipeline, so the runner must start on 3.9 and the probe must answer on 2.7."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.devices.profile_device import profile_on_device
from pipeline.devices.transport import LocalTransport
from pipeline.errors import DeviceError
from pipeline.stages.profile import RUNNER, BenchSettings

pytest_plugins = ("devices_fixtures",)

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


def test_runner_starts_on_python39() -> None:
    """Its module-level code and argparse run on 3.9 (`--help` exits before numpy is imported)."""
    python = _pyenv("3.9")
    if python is None:
        pytest.skip(f"no Python 3.9 under {PYENV}")
    proc = subprocess.run([str(python), str(RUNNER), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--model" in proc.stdout, proc.stderr
