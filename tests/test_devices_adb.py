"""The adb transport with the real `adb` client (Debian package adb) against tests/adb_device.py, a device side of
the adb wire protocol in Python.

What differs from a phone, on purpose visible: the test device runs its shell commands on THIS machine (/bin/sh
here, mksh/toybox on Android), so the device-side runner is run with this venv's Python. A real phone has no
Python: there the runner needs one installed (e.g. Termux) or TFLite's `benchmark_model` binary is used instead,
which cannot be installed here, so that path runs a stand-in script that checks its flags and prints
benchmark_model output in its real format (tests/data/benchmark_model). No getprop, taskset or /data/local/tmp
exist on the test device; the workdir is a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from adb_device import AdbDevice

from pipeline.bench import BenchSettings
from pipeline.devices.adb import RC_MARK, AdbTransport
from pipeline.devices.profile_device import profile_files, profile_on_device
from pipeline.errors import DeviceError

pytest_plugins = ("devices_fixtures",)

FAST = BenchSettings(threads=1, warmup=2, runs=20)
DATA = Path(__file__).parent / "data" / "benchmark_model"

pytestmark = pytest.mark.skipif(
    shutil.which("adb") is None, reason="adb client missing: run .ci/setup_devices.sh (apt-get install adb)"
)


@pytest.fixture
def server_port() -> Iterator[int]:
    """A private adb server port (never the user's 5037); the server is always killed afterwards."""
    from devices_fixtures import free_port

    port = free_port()
    try:
        yield port
    finally:
        subprocess.run(["adb", "-P", str(port), "kill-server"], capture_output=True, timeout=30, check=False)


@pytest.fixture
def device() -> Iterator[AdbDevice]:
    dev = AdbDevice()
    try:
        yield dev
    finally:
        dev.stop()


def _transport(dev: AdbDevice, port: int, tmp_path: Path, **kw) -> AdbTransport:
    return AdbTransport(dev.serial, server_port=port, python=sys.executable, workdir=str(tmp_path / "work"), **kw)


def test_shell_exit_status_output_stdin_and_quoting(device, server_port, tmp_path: Path) -> None:
    t = _transport(device, server_port, tmp_path)
    done = t.run(["sh", "-c", "echo out; echo err >&2; exit 5"], timeout_s=30)
    assert (done.rc, done.stdout, done.stderr) == (5, "out\n", "err\n")
    assert t.run(["cat"], timeout_s=30, stdin=b"to the device").stdout == "to the device"
    odd = ["a b", "it's", '"q"', "$HOME", "`id`", "*", "", ";reboot", "--help"]
    done = t.run([sys.executable, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *odd], timeout_s=30)
    assert done.rc == 0 and json.loads(done.stdout) == odd
    assert all(RC_MARK in c for c in device.commands)  # the status comes from the marker, not from adb's exit
    raw = subprocess.run(["adb", "-P", str(server_port), "-s", device.serial, "shell", "exit 9"], timeout=30)
    assert raw.returncode == 9  # this device speaks shell v2; Android before 7 would give 0 here
    t.close()


def test_push_pull_byte_exact(device, server_port, tmp_path: Path) -> None:
    t = _transport(device, server_port, tmp_path)
    data = os.urandom(700_000) + bytes(range(256))
    (tmp_path / "src.bin").write_bytes(data)
    remote = str(tmp_path / "on device" / "x.bin")
    t.push(tmp_path / "src.bin", remote)
    assert Path(remote).read_bytes() == data
    t.pull(remote, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    with pytest.raises(DeviceError, match=r"adb pull .*missing.bin.* does not exist"):
        t.pull(str(tmp_path / "missing.bin"), tmp_path / "x")


def test_profile_with_the_host_python_through_adb(device, server_port, tmp_path: Path, tiny_tflite_file) -> None:
    """The runner runs under this machine's venv Python: the device side executes commands on the host."""
    t = _transport(device, server_port, tmp_path)
    r = profile_on_device(tiny_tflite_file, FAST, t, timeout_s=120)
    lat = r["latency_ms"]
    assert r["runtime"] == "ai-edge-litert" and r["runs"] == 20
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
    assert r["device"]["transport"] == "adb" and r["device"]["serial"] == device.serial
    assert r["measured"] == f"measured on adb:{device.serial}"
    assert os.listdir(tmp_path / "work") == []
    t.close()


def test_benchmark_model_path_with_a_stand_in_binary(device, server_port, tmp_path: Path, tiny_tflite_file) -> None:
    """No benchmark_model can be installed here: a stand-in checks the flags and prints its real output format."""
    stand_in = tmp_path / "benchmark_model"
    stand_in.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--graph=*m0.tflite*--num_threads=1*--warmup_runs=2*--num_runs=20*--use_xnnpack=true*) ;;\n'
        '  *) echo "ERROR: unexpected flags: $*" >&2; exit 2;; esac\n'
        'test -s "${1#--graph=}" || { echo "ERROR: no model" >&2; exit 3; }\n'
        f"cat {DATA / 'modern_xnnpack.txt'} >&2\n"
    )
    stand_in.chmod(0o755)
    t = _transport(device, server_port, tmp_path)
    r = profile_on_device(tiny_tflite_file, FAST, t, benchmark_model=str(stand_in), timeout_s=60)
    assert r["runtime"] == "benchmark_model" and r["runs"] == 181 and r["latency_ms"]["p50"] == 5.53
    assert r["device"]["machine"] == os.uname().machine and "model" not in r["device"]  # no getprop here
    t.close()


def test_no_device_attached(server_port) -> None:
    t = AdbTransport(None, server_port=server_port, connect_timeout_s=5)
    with pytest.raises(DeviceError, match=r"no Android device is attached.*USB debugging.*adb devices"):
        t.run(["true"], timeout_s=30)
    with pytest.raises(DeviceError, match=r"that device is not attached.*emulator-5554"):
        AdbTransport("emulator-5554", server_port=server_port).run(["true"], timeout_s=30)


def test_connect_to_a_closed_port_is_refused_despite_exit_0(server_port) -> None:
    from devices_fixtures import free_port

    closed = f"127.0.0.1:{free_port()}"
    out = subprocess.run(["adb", "-P", str(server_port), "connect", closed], capture_output=True, text=True)
    assert out.returncode == 0  # what adb does; the transport reads the text
    with pytest.raises(DeviceError, match=rf"adb connect {closed} failed: .*refused"):
        AdbTransport(closed, server_port=server_port).connect()


def test_unauthorized_device(server_port) -> None:
    """A phone whose 'Allow USB debugging?' prompt nobody accepts (`adb connect` says 'failed to authenticate')."""
    waiting = AdbDevice(mode="unauthorized")
    try:
        with pytest.raises(DeviceError, match=r"has not authorized this computer.*Allow USB debugging"):
            AdbTransport(waiting.serial, server_port=server_port, connect_timeout_s=5).connect()
        subprocess.run(["adb", "-P", str(server_port), "connect", waiting.serial], capture_output=True, timeout=30)
        with pytest.raises(DeviceError, match=r"has not authorized this computer"):  # known to adb: get-state says so
            AdbTransport(waiting.serial, server_port=server_port, connect_timeout_s=5).run(["true"], timeout_s=30)
    finally:
        waiting.stop()


def test_adb_error_texts() -> None:
    """adb's own messages (as adb 29 prints them) for states the test device cannot be put in quickly."""
    from pipeline.devices.adb import adb_error

    assert "is offline" in str(adb_error("error: device offline\n", "adb:X", doing="running x on"))
    assert "DEVICE=adb:SERIAL" in str(adb_error("error: more than one device/emulator\n", "adb", doing="x"))
    assert "went away" in str(adb_error("error: closed\n", "adb:X", doing="running x on"))
    assert adb_error("ls: /x: No such file or directory", "adb:X", doing="x") is None


def test_adb_client_missing() -> None:
    with pytest.raises(DeviceError, match=r"adb client '/nonexistent/adb' not found: install the adb client"):
        AdbTransport("X", adb="/nonexistent/adb")


def test_device_going_away_mid_run_keeps_what_was_measured(device, server_port, tmp_path, tiny_tflite_file) -> None:
    second = tmp_path / "second.tflite"
    shutil.copyfile(tiny_tflite_file, second)
    t = _transport(device, server_port, tmp_path)
    timers: list[threading.Timer] = []

    def after_first(name: str, result: dict) -> None:
        timers.append(threading.Timer(1.0, device.stop))
        timers[0].start()

    slow = BenchSettings(threads=1, warmup=1, runs=5, min_seconds=3.0, max_seconds=3.0)
    start = time.monotonic()
    run = profile_files({"first": tiny_tflite_file, "second": second}, slow, t, timeout_s=120, on_result=after_first)
    timers[0].join()
    assert time.monotonic() - start < 60
    assert list(run.results) == ["first"] and run.error is not None
    assert "went away" in str(run.error) and "1 of 2 model(s) measured before that are kept" in str(run.error)
