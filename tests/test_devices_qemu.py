"""Profile on an emulated Raspberry Pi: arm64 Debian bookworm under qemu-user, reached over a real sshd that
chroots into it (tests/qemu_rootfs.py). The device has only python3 + numpy<2 + tflite-runtime 2.14 (like a Pi
with `pip install tflite-runtime 'numpy<2'`), so this proves the device path end to end on a foreign machine:
probe, copies, runner, figures, cleanup. Emulated code is ~100x slower: nothing here is a timing claim.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from qemu_rootfs import cache_dir

from pipeline.bench import BenchSettings
from pipeline.devices.profile_device import profile_many

pytest_plugins = ("devices_fixtures",)
pytestmark = pytest.mark.slow

if TYPE_CHECKING:
    from devices_fixtures import Sshd


def test_uname_and_exit_status_in_the_emulated_pi(arm64_sshd: Sshd) -> None:
    t = arm64_sshd.transport(python="python3", workdir="/tmp/edgeship")
    assert t.run(["uname", "-m"], timeout_s=120).stdout.strip() == "aarch64"
    assert t.run(["sh", "-c", "exit 4"], timeout_s=120).rc == 4


def test_profile_on_the_emulated_pi_and_this_host_at_once(arm64_sshd: Sshd, tiny_tflite_file: Path, tmp_path) -> None:
    """Two devices in parallel: the arm64 Debian (tflite-runtime) and this machine over its own sshd."""
    from devices_fixtures import start_sshd

    pi = arm64_sshd.transport(python="python3", workdir="/tmp/edgeship")
    host_sshd = start_sshd(tmp_path / "host-sshd")
    try:
        host = host_sshd.transport(python=sys.executable)
        start = time.monotonic()
        runs = profile_many(tiny_tflite_file, BenchSettings(threads=1, warmup=1, runs=5), {"pi": pi, "host": host},
                            timeout_s=400)  # fmt: skip
        sys.stderr.write(f"\nprofile on emulated arm64 + host: {time.monotonic() - start:.1f} s\n")
    finally:
        host_sshd.stop()
    assert runs["pi"].ok, runs["pi"].error
    assert runs["host"].ok, runs["host"].error
    r = runs["pi"].results["conv.tflite"]
    assert r["device"]["machine"] == "aarch64" and r["machine"] == "aarch64"
    assert (r["runtime"], r["runtime_version"]) == ("tflite-runtime", "2.14.0")
    assert r["device"]["python"].startswith("3.11") and r["runs"] == 5
    assert r["input"] == {"shape": [1, 8, 8, 3], "dtype": "float32"}
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["max"] and r["peak_rss_kib"] > 0
    assert r["measured"] == f"measured on root@127.0.0.1:{arm64_sshd.port}"
    assert runs["host"].results["conv.tflite"]["device"]["machine"] == "x86_64"
    assert not any((cache_dir() / "tmp/edgeship").glob("run-*"))  # the per-run folder was removed on the device
