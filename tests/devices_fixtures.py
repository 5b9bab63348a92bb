"""Fixtures for the device tests: a real sshd on loopback and a tiny real .tflite file.

Use from a test module with `pytest_plugins = ("devices_fixtures",)`. The sshd runs as root on 127.0.0.1 with
its own host key, one authorized client key and an explicit known_hosts file; it skips (with the reason) when
not root or when openssh-server is missing (.ci/setup_devices.sh installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import flatbuffers
import numpy as np
import pytest

from pipeline.devices.ssh import SshOptions, SshTransport

SSHD = "/usr/sbin/sshd"


# ------------------------------------------------------------------------------------ a tiny .tflite


def tiny_tflite(path: Path) -> Path:
    """A real float32 .tflite written with the TFLite flatbuffer schema (no TensorFlow, milliseconds):
    x (1,8,8,3) -> CONV_2D 3x3 SAME, 8 filters, ReLU -> y (1,8,8,8). Runs on ai-edge-litert and tflite-runtime."""
    from ai_edge_litert import schema_py_generated as schema

    rng = np.random.default_rng(0)
    model = schema.ModelT()
    model.version = 3
    model.description = "edgeship device-test conv"
    model.buffers = [schema.BufferT()]
    sg = schema.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs = [], [0], [3]
    for name, shape, data in (
        ("x", (1, 8, 8, 3), None),
        ("w", (8, 3, 3, 3), rng.standard_normal((8, 3, 3, 3)).astype("<f4")),
        ("b", (8,), np.zeros(8, "<f4")),
        ("y", (1, 8, 8, 8), None),
    ):
        t = schema.TensorT()
        t.name, t.type, t.shape, t.buffer = name, schema.TensorType.FLOAT32, list(shape), 0
        if data is not None:
            buf = schema.BufferT()
            buf.data = np.frombuffer(data.tobytes(), dtype=np.uint8)
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
        sg.tensors.append(t)
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CONV_2D
    code.version = 1
    model.operatorCodes = [code]
    opts = schema.Conv2DOptionsT()
    opts.padding = schema.Padding.SAME
    opts.strideW = opts.strideH = opts.dilationWFactor = opts.dilationHFactor = 1
    opts.fusedActivationFunction = schema.ActivationFunctionType.RELU
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.Conv2DOptions, opts
    sg.operators = [op]
    model.subgraphs = [sg]
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


@pytest.fixture(scope="session")
def tiny_tflite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tflite(tmp_path_factory.mktemp("devtfl") / "conv.tflite")


# ------------------------------------------------------------------------------------ sshd on loopback


def sshd_missing_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the test sshd runs as root on 127.0.0.1 (it logs in as root with a test key)"
    if not Path(SSHD).is_file():
        return "openssh-server missing: run .ci/setup_devices.sh (apt-get install openssh-server)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "openssh-client missing: apt-get install openssh-client"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return path


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Sshd:
    """A running sshd: its port, keys, known_hosts and log."""

    port: int
    dir: Path
    client_key: Path
    known_hosts: Path
    host_key_line: str
    log: Path
    proc: subprocess.Popen[bytes]
    transports: list[SshTransport] = field(default_factory=list)

    def options(self, **kw: object) -> SshOptions:
        base: dict[str, object] = {
            "known_hosts": self.known_hosts,
            "identity": self.client_key,
            "config_file": Path("/dev/null"),
        }
        return SshOptions(**{**base, **kw})  # type: ignore[arg-type]

    def transport(self, *, python: str = "python3", workdir: str | None = None, **kw: object) -> SshTransport:
        t = SshTransport(
            "127.0.0.1",
            user="root",
            port=self.port,
            python=python,
            workdir=workdir or str(self.dir / "remote-work"),
            options=self.options(**kw),
        )
        self.transports.append(t)
        return t

    def accepted_logins(self) -> int:
        return self.log.read_text(errors="replace").count("Accepted publickey")

    def kill(self) -> None:
        """Kill sshd and every session it serves (by pid), as when the device dies or drops off the network."""
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        for t in self.transports:
            t.close()
        if self.proc.poll() is None:
            self.kill()


def start_sshd(dir: Path, *, chroot: Path | None = None, wrap: Sequence[str] = ()) -> Sshd:
    """Start `sshd -D` on a free loopback port (optionally chrooted, optionally under a wrapper argv)."""
    dir.mkdir(parents=True, exist_ok=True)
    host_key = keygen(dir / "host_key")
    client_key = keygen(dir / "client_key")
    port = free_port()
    lines = [
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {host_key}",
        f"PidFile {dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {dir / 'client_key.pub'}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PrintMotd no",
        "Subsystem sftp internal-sftp",
    ]
    if chroot is not None:
        lines.append(f"ChrootDirectory {chroot}")
    cfg = dir / "sshd_config"
    cfg.write_text("\n".join(lines) + "\n")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    log = dir / "sshd.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([*wrap, SSHD, "-D", "-e", "-f", str(cfg)], stdout=fh, stderr=subprocess.STDOUT)
    key_type, key_b64 = host_key.with_suffix(".pub").read_text().split()[:2]
    host_key_line = f"{key_type} {key_b64}"
    known_hosts = dir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key_line}\n")
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited at start: {log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"sshd did not listen on {port}: {log.read_text(errors='replace')}") from None
            time.sleep(0.02)
    return Sshd(port, dir, client_key, known_hosts, host_key_line, log, proc)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    reason = sshd_missing_reason()
    if reason:
        pytest.skip(reason)
    server = start_sshd(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def arm64_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real sshd chrooted into the arm64 Debian rootfs under qemu-user (tests/qemu_rootfs.py): the emulated
    Raspberry Pi. Skips, saying why, where qemu, binfmt, the rootfs or sshd is missing."""
    import sys

    from qemu_rootfs import binfmt_aarch64, chroot_wrap, ensure_rootfs, missing_reason

    reason = sshd_missing_reason() or missing_reason()
    if reason:
        pytest.skip(reason)
    rootfs, how = ensure_rootfs()
    if rootfs is None:
        pytest.skip(how)
    sys.stderr.write(f"\narm64 rootfs {rootfs}: {how}\n")
    with binfmt_aarch64():
        server = start_sshd(tmp_path_factory.mktemp("arm64") / "sshd", chroot=rootfs, wrap=chroot_wrap(rootfs))
        try:
            yield server
        finally:
            server.stop()
