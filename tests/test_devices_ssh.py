"""The SSH transport against a real sshd on loopback (tests/devices_fixtures.py): commands, files, multiplexing,
host-key and login refusals, a device that dies mid-run, and names with shell metacharacters.

The "device" is this machine reached through a real sshd as root, so the runner uses this venv's Python (which
has numpy and ai-edge-litert); tests/test_devices_qemu.py does the same against an emulated arm64 Debian.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.bench import BenchSettings
from pipeline.devices import DeviceSpec, open_transport, parse_devices, profile_files, profile_on_device
from pipeline.devices.profile_device import profile_many
from pipeline.devices.ssh import SshTransport
from pipeline.errors import DeviceError, UsageError

pytest_plugins = ("devices_fixtures",)

FAST = BenchSettings(threads=1, warmup=2, runs=20)


def test_run_returns_exit_status_output_and_stdin(sshd) -> None:
    t = sshd.transport()
    done = t.run(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout_s=30)
    assert (done.rc, done.stdout, done.stderr.strip()) == (7, "out\n", "err")
    assert t.run(["cat"], timeout_s=30, stdin=b"through stdin\x00\xff").stdout.encode("latin-1", "replace")[:13] == (
        b"through stdin"
    )
    odd = ["a b", "it's", '"q"', "$HOME", "`id`", "*", "", "x\ny", "--help"]
    done = t.run([sys.executable, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *odd], timeout_s=30)
    assert done.rc == 0 and done.stdout.strip() == json.dumps(odd)


def test_push_pull_byte_exact(sshd, tmp_path: Path) -> None:
    t = sshd.transport()
    data = os.urandom(300_000) + bytes(range(256)) * 8
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    src.write_bytes(data)
    remote = str(tmp_path / "remote dir")
    assert t.run(["mkdir", "-p", remote], timeout_s=30).rc == 0
    t.push(src, f"{remote}/copy.bin")
    digest = t.run(["sha256sum", f"{remote}/copy.bin"], timeout_s=30).stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    t.pull(f"{remote}/copy.bin", back)
    assert back.read_bytes() == data
    with pytest.raises(DeviceError, match=r"copying .*missing.bin.* failed"):
        t.pull(f"{remote}/missing.bin", back)
    with pytest.raises(DeviceError, match=r"copying src.bin to .* failed"):
        t.push(src, f"{remote}/no/such/dir/copy.bin")


def test_one_connection_is_multiplexed_and_closed(sshd) -> None:
    t = sshd.transport()
    for _ in range(5):
        assert t.run(["true"], timeout_s=30).rc == 0
    assert t.multiplexed()
    assert sshd.accepted_logins() == 1  # five commands, one login
    control = Path(t.control_path or "")
    assert control.is_socket() and len(str(control)) < 100 and control.parent.stat().st_mode & 0o077 == 0
    check = [*t._ssh_argv(), "-O", "check", "--", "127.0.0.1"]
    out = subprocess.run(check, capture_output=True, text=True, timeout=10).stderr
    master = int(re.search(r"pid=(\d+)", out).group(1))
    t.close()
    assert not control.parent.exists()
    for _ in range(50):
        if not Path(f"/proc/{master}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{master}").exists(), "the ssh master outlived close()"


def test_unknown_host_key_is_refused_and_not_recorded(sshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = sshd.transport(known_hosts=empty)
    with pytest.raises(DeviceError, match=r"host key is not in known_hosts.*never accepts keys blindly"):
        t.run(["true"], timeout_s=30)
    assert empty.read_text() == ""
    assert sshd.accepted_logins() == 0


def test_changed_host_key_is_refused(sshd, tmp_path: Path) -> None:
    from devices_fixtures import keygen

    other = keygen(tmp_path / "other").with_suffix(".pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other)}\n")
    t = sshd.transport(known_hosts=wrong)
    with pytest.raises(DeviceError, match=r"host key CHANGED.*ssh-keygen -R 127.0.0.1"):
        t.run(["true"], timeout_s=30)
    assert sshd.accepted_logins() == 0


def test_wrong_client_key_is_refused(sshd, tmp_path: Path) -> None:
    from devices_fixtures import keygen

    t = sshd.transport(identity=keygen(tmp_path / "stranger"))
    with pytest.raises(DeviceError, match=r"refused the login.*ssh-copy-id root@127.0.0.1"):
        t.run(["true"], timeout_s=30)


def test_closed_port_is_connection_refused(sshd) -> None:
    from devices_fixtures import free_port

    t = SshTransport("127.0.0.1", user="root", port=free_port(), options=sshd.options())
    try:
        with pytest.raises(DeviceError, match=r"connection refused.*is sshd running"):
            t.run(["true"], timeout_s=30)
    finally:
        t.close()


def test_profile_one_model_over_ssh(sshd, tiny_tflite_file: Path) -> None:
    t = sshd.transport(python=sys.executable)
    r = profile_on_device(tiny_tflite_file, FAST, t, timeout_s=120)
    lat = r["latency_ms"]
    assert r["runtime"] == "ai-edge-litert" and r["runs"] == 20 and r["threads"] == 1
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and lat["std"] >= 0
    assert r["input"] == {"shape": [1, 8, 8, 3], "dtype": "float32"}
    assert r["size_bytes"] == tiny_tflite_file.stat().st_size and r["peak_rss_kib"] > 0
    assert r["device"]["transport"] == "ssh" and r["device"]["port"] == sshd.port
    assert r["device"]["machine"] == os.uname().machine
    assert r["measured"] == f"measured on root@127.0.0.1:{sshd.port}"
    assert os.listdir(t.workdir) == []  # the per-run folder is gone


def test_device_without_numpy_or_interpreter_says_what_to_install(sshd, tmp_path: Path, tiny_tflite_file) -> None:
    """Real probes over ssh with a Python that lacks numpy, then one with numpy but no TFLite interpreter."""
    import numpy

    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    (tmp_path / "only-numpy").mkdir()
    (tmp_path / "only-numpy" / "numpy").symlink_to(Path(numpy.__file__).parent)
    numpy_only = tmp_path / "numpy-python"
    numpy_only.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "only-numpy"} exec {sys.executable} -S "$@"\n')
    for script in (bare, numpy_only):
        script.chmod(0o755)
    with pytest.raises(DeviceError, match=r"numpy is missing on .*pip install ai-edge-litert.*numpy<2"):
        profile_on_device(tiny_tflite_file, FAST, sshd.transport(python=str(bare)), timeout_s=60)
    with pytest.raises(DeviceError, match=r"no TFLite interpreter on .*pip install ai-edge-litert.*tflite-runtime"):
        profile_on_device(tiny_tflite_file, FAST, sshd.transport(python=str(numpy_only)), timeout_s=60)
    with pytest.raises(DeviceError, match=r"no '/nonexistent/python3' on .*benchmark_model"):
        profile_on_device(tiny_tflite_file, FAST, sshd.transport(python="/nonexistent/python3"), timeout_s=60)


def test_sshd_killed_mid_run_keeps_what_was_measured(sshd, tmp_path: Path, tiny_tflite_file: Path) -> None:
    second = tmp_path / "second.tflite"
    shutil.copyfile(tiny_tflite_file, second)
    t = sshd.transport(python=sys.executable)
    killer: list[threading.Timer] = []

    def after_first(name: str, result: dict) -> None:  # kill sshd 1 s into the second model's 3 s of timing
        killer.append(threading.Timer(1.0, sshd.kill))
        killer[0].start()

    slow = BenchSettings(threads=1, warmup=1, runs=5, min_seconds=3.0, max_seconds=3.0)
    start = time.monotonic()
    run = profile_files({"first": tiny_tflite_file, "second": second}, slow, t, timeout_s=120, on_result=after_first)
    killer[0].join()
    assert time.monotonic() - start < 60  # noticed at once, not at the timeout
    assert list(run.results) == ["first"] and run.results["first"]["latency_ms"]["p50"] > 0
    assert run.error is not None and not run.ok
    assert re.search(r"connection to the device was lost \(the device went away", str(run.error))
    assert "1 of 2 model(s) measured before that are kept" in str(run.error)


def test_profile_many_keeps_the_good_device_when_one_fails(sshd, tiny_tflite_file: Path) -> None:
    from devices_fixtures import free_port

    good = sshd.transport(python=sys.executable)
    bad = SshTransport("127.0.0.1", user="root", port=free_port(), options=sshd.options())
    try:
        runs = profile_many(tiny_tflite_file, FAST, {"good": good, "bad": bad}, timeout_s=120)
    finally:
        bad.close()
    assert runs["good"].ok and runs["good"].results["conv.tflite"]["runs"] == 20
    assert runs["bad"].results == {} and "connection refused" in str(runs["bad"].error)


def test_shell_metacharacters_never_reach_a_shell(sshd, tmp_path: Path, tiny_tflite_file: Path) -> None:
    pwned = tmp_path / "pwned"
    evil = f";touch {pwned}"
    with pytest.raises(UsageError, match=r"the host '127.0.0.1;touch .*' is not valid"):
        parse_devices(f"root@127.0.0.1{evil}")
    with pytest.raises(UsageError, match=r"the user 'root\$\(touch"):
        parse_devices(f"root$(touch {pwned})@127.0.0.1")
    with pytest.raises(DeviceError, match="ssh host"):
        SshTransport(f"127.0.0.1{evil}")
    with pytest.raises(UsageError, match="workdir"):
        open_transport(DeviceSpec("ssh", host="127.0.0.1", workdir=f"/tmp/x{evil}"))
    t = sshd.transport(python=sys.executable)
    assert t.run(["ls", f"/nonexistent{evil}"], timeout_s=30).rc != 0
    odd_dir = tmp_path / f"d $(touch {pwned}) `touch {pwned}` {evil} 'q"
    assert t.run(["mkdir", "-p", str(odd_dir)], timeout_s=30).rc == 0
    marker = f"pwned-{os.getpid()}-{time.monotonic_ns()}"  # file names cannot hold '/': touch a relative name
    name = f"m;touch {marker};$(touch {marker})`touch {marker}` 'x.tflite"
    local = tmp_path / name
    shutil.copyfile(tiny_tflite_file, local)
    t.push(local, str(odd_dir / name))
    t.pull(str(odd_dir / name), tmp_path / "back")
    assert (odd_dir / name).read_bytes() == local.read_bytes() == (tmp_path / "back").read_bytes()
    assert profile_on_device(local, FAST, t, timeout_s=120)["runs"] == 20
    assert not pwned.exists()
    for where in (tmp_path, Path.home(), Path.cwd(), Path("/")):
        assert not (where / marker).exists()


def test_profile_devices_from_a_device_list_and_the_profile(sshd, tmp_path: Path, tiny_tflite_file: Path) -> None:
    """DEVICE=a,b merged with the profile's transport section (python, workdir); transports closed afterwards."""
    from devices_fixtures import free_port

    from pipeline.devices import profile_devices
    from pipeline.targets import SshTransport as SshSection

    section = SshSection(kind="ssh", user="root", python=sys.executable, workdir=str(tmp_path / "w"))
    specs = parse_devices(f"127.0.0.1:{sshd.port},127.0.0.1:{free_port()}", section)
    before = set(Path("/tmp").glob("es-ssh-*"))
    runs = profile_devices({"fp32": tiny_tflite_file}, FAST, specs, ssh_options=sshd.options(), timeout_s=120)
    good, bad = (runs[s.name] for s in specs)
    assert list(runs) == [f"root@127.0.0.1:{sshd.port}", specs[1].name]
    assert good.ok and good.results["fp32"]["device"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "connection refused" in str(bad.error) and bad.to_json()["results"] == {}
    assert set(Path("/tmp").glob("es-ssh-*")) == before
