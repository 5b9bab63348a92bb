"""A device side of the adb wire protocol over TCP, in Python, for testing against the real `adb` client.

`adb connect 127.0.0.1:PORT` talks to it as to a phone with wireless debugging: CNXN handshake (no AUTH),
OPEN/OKAY/WRTE/CLSE streams with one outstanding WRTE per stream, and two services:
- `shell:CMD` (v1: stdout+stderr merged, no exit status) and `shell,v2,...:CMD` (the shell protocol: packets
  [id u8][len u32] for stdin 0, stdout 1, stderr 2, exit 3, close-stdin 4), since the banner advertises shell_v2;
- `sync:` with STAT, SEND (DATA chunks, DONE), RECV and QUIT (v1 messages: 4-byte id + u32 length).

Commands run on THIS machine (`/bin/sh -c CMD`, or under a prefix such as `chroot ROOTFS`): a real phone has no
Python, `getprop`-less shells do not exist there, and so on. Tests that use it say what differs from Android.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import stat
import struct
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

A_CNXN, A_OPEN, A_OKAY, A_CLSE, A_WRTE, A_AUTH = (
    int.from_bytes(name, "little") for name in (b"CNXN", b"OPEN", b"OKAY", b"CLSE", b"WRTE", b"AUTH")
)
A_VERSION = 0x01000001
MAX_PAYLOAD = 256 * 1024
BANNER = b"device::ro.product.name=edgeship_test;ro.product.model=PyAdbDevice;ro.product.device=pyadb;" + (
    b"features=shell_v2,cmd\x00"
)
AUTH_TOKEN, AUTH_SIGNATURE, AUTH_RSAPUBLICKEY = 1, 2, 3
SHELL_STDIN, SHELL_STDOUT, SHELL_STDERR, SHELL_EXIT, SHELL_CLOSE_STDIN = 0, 1, 2, 3, 4


def _message(command: int, arg0: int, arg1: int, data: bytes = b"") -> bytes:
    return struct.pack("<6I", command, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF, command ^ 0xFFFFFFFF) + data


class _Stream:
    def __init__(self, conn: _Connection, local_id: int, remote_id: int) -> None:
        self.conn, self.local_id, self.remote_id = conn, local_id, remote_id
        self.inbox: queue.Queue[bytes | None] = queue.Queue()
        self.okay = threading.Event()
        self.closed = False
        self._write_lock = threading.Lock()
        self._buf = b""

    def write(self, data: bytes) -> bool:
        with self._write_lock:
            for i in range(0, len(data), self.conn.max_payload):
                if self.closed:
                    return False
                self.okay.clear()
                self.conn.send(A_WRTE, self.local_id, self.remote_id, data[i : i + self.conn.max_payload])
                if not self.okay.wait(60) or self.closed:
                    return False
        return True

    def read_exact(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            chunk = self.inbox.get()
            if chunk is None:
                return None
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.send(A_CLSE, self.local_id, self.remote_id)
        self.conn.streams.pop(self.local_id, None)


class _Connection:
    def __init__(self, device: AdbDevice, sock: socket.socket) -> None:
        self.device, self.sock = device, sock
        self.max_payload = 4096
        self.streams: dict[int, _Stream] = {}
        self._send_lock = threading.Lock()
        self._next_id = 1

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        with self._send_lock, contextlib.suppress(OSError):
            self.sock.sendall(_message(command, arg0, arg1, data))

    def _recv_exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def serve(self) -> None:
        try:
            while True:
                header = self._recv_exact(24)
                if header is None:
                    return
                command, arg0, arg1, length, _check, _magic = struct.unpack("<6I", header)
                data = self._recv_exact(length) if length else b""
                if data is None:
                    return
                self._dispatch(command, arg0, arg1, data)
        finally:
            for s in list(self.streams.values()):
                s.closed = True
                s.okay.set()
                s.inbox.put(None)
            with contextlib.suppress(OSError):
                self.sock.close()

    def _dispatch(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        if command == A_CNXN:
            if self.device.mode == "silent":  # a device that accepts TCP and never answers
                return
            if self.device.mode == "unauthorized":
                self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(20))
                return
            self.max_payload = max(4096, min(arg1, MAX_PAYLOAD))
            self.send(A_CNXN, A_VERSION, MAX_PAYLOAD, BANNER)
        elif command == A_OPEN:
            local_id, self._next_id = self._next_id, self._next_id + 1
            stream = _Stream(self, local_id, arg0)
            self.streams[local_id] = stream
            service = data.rstrip(b"\x00").decode("utf-8", "replace")
            handler = self.device.handler(service)
            if handler is None:
                self.send(A_CLSE, 0, arg0)
                self.streams.pop(local_id, None)
                return
            self.send(A_OKAY, local_id, arg0)
            threading.Thread(target=handler, args=(stream, service), daemon=True).start()
        elif command == A_OKAY:
            if (s := self.streams.get(arg1)) is not None:
                s.remote_id = arg0
                s.okay.set()
        elif command == A_WRTE:
            if (s := self.streams.get(arg1)) is not None:
                self.send(A_OKAY, s.local_id, s.remote_id)
                s.inbox.put(data)
        elif command == A_CLSE and (s := self.streams.pop(arg1, None)) is not None:
            s.closed = True
            s.okay.set()
            s.inbox.put(None)
        elif command == A_AUTH and arg0 == AUTH_SIGNATURE:
            # No key of ours is trusted: ask again; the client then offers its public key (AUTH_RSAPUBLICKEY), and
            # a real phone would show "Allow USB debugging?". Nobody accepts it here.
            self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(20))


class AdbDevice:
    """Listen on 127.0.0.1:`port` (0: a free one); `shell` is the argv prefix that runs a command string, and
    `root` is where device paths of push/pull live (both on this machine). `mode`: "device" (answers),
    "unauthorized" (asks for a key and never accepts one, as a phone whose prompt nobody taps), "silent"
    (accepts TCP, never answers: adb shows it offline)."""

    def __init__(
        self,
        *,
        port: int = 0,
        shell: Sequence[str] = ("/bin/sh", "-c"),
        root: Path = Path("/"),
        mode: str = "device",
    ) -> None:
        self.shell, self.root, self.mode = tuple(shell), root, mode
        self.commands: list[str] = []  # every shell command received, for tests to inspect
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = int(self._server.getsockname()[1])
        self._conns: list[_Connection] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def serial(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock)
            self._conns.append(conn)
            threading.Thread(target=conn.serve, daemon=True).start()

    def stop(self) -> None:
        """Go away like an unplugged phone: stop listening, drop every connection, kill running commands."""
        with contextlib.suppress(OSError):
            self._server.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()

    # ------------------------------------------------------------------------------------ services

    def handler(self, service: str):
        if service.startswith("shell"):
            return self._shell
        if service == "sync:":
            return self._sync
        return None

    def _path(self, device_path: str) -> Path:
        return self.root / device_path.lstrip("/")

    def _shell(self, stream: _Stream, service: str) -> None:
        options, _, command = service.partition(":")
        v2 = "v2" in options.split(",")
        self.commands.append(command)
        proc = subprocess.Popen(
            [*self.shell, command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if v2 else subprocess.STDOUT,
            cwd=self.root,
        )
        self._procs.append(proc)

        def packet(kind: int, data: bytes) -> bytes:
            return struct.pack("<BI", kind, len(data)) + data if v2 else data

        def pump(pipe, kind: int) -> None:
            for chunk in iter(lambda: os.read(pipe.fileno(), 65536), b""):
                stream.write(packet(kind, chunk))

        readers = [threading.Thread(target=pump, args=(proc.stdout, SHELL_STDOUT), daemon=True)]
        if v2:
            readers.append(threading.Thread(target=pump, args=(proc.stderr, SHELL_STDERR), daemon=True))
        threading.Thread(target=self._feed_stdin, args=(stream, proc, v2), daemon=True).start()
        for r in readers:
            r.start()
        for r in readers:
            r.join()
        rc = proc.wait()
        if v2:
            stream.write(packet(SHELL_EXIT, bytes([rc & 0xFF])))
        stream.close()

    @staticmethod
    def _feed_stdin(stream: _Stream, proc: subprocess.Popen[bytes], v2: bool) -> None:
        assert proc.stdin is not None
        try:
            while True:
                if v2:
                    header = stream.read_exact(5)
                    if header is None:
                        break
                    kind, length = struct.unpack("<BI", header)
                    data = stream.read_exact(length) if length else b""
                    if data is None:
                        break
                    if kind == SHELL_STDIN:
                        proc.stdin.write(data)
                        proc.stdin.flush()
                    elif kind == SHELL_CLOSE_STDIN:
                        break
                else:
                    chunk = stream.inbox.get()
                    if chunk is None:
                        break
                    proc.stdin.write(chunk)
                    proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        with contextlib.suppress(OSError):
            proc.stdin.close()

    def _sync(self, stream: _Stream, _service: str) -> None:
        def reply(tag: bytes, value: int, data: bytes = b"") -> bool:
            return stream.write(tag + struct.pack("<I", value) + data)

        def fail(message: str) -> None:
            data = message.encode()
            reply(b"FAIL", len(data), data)

        while True:
            header = stream.read_exact(8)
            if header is None:
                break
            tag, length = header[:4], struct.unpack("<I", header[4:])[0]
            if tag == b"QUIT":
                break
            arg = stream.read_exact(length)
            if arg is None:
                break
            name = arg.decode("utf-8", "surrogateescape")
            if tag == b"STAT":
                try:
                    st = os.stat(self._path(name))
                    reply(b"STAT", st.st_mode, struct.pack("<II", st.st_size & 0xFFFFFFFF, int(st.st_mtime)))
                except OSError:
                    reply(b"STAT", 0, struct.pack("<II", 0, 0))
            elif tag == b"SEND":
                path, _, mode = name.rpartition(",")
                if not self._receive_file(stream, self._path(path), int(mode or "420"), fail):
                    break
                reply(b"OKAY", 0)
            elif tag == b"RECV":
                try:
                    data = self._path(name).read_bytes()
                except OSError as exc:
                    fail(f"{name}: {exc.strerror}")
                    continue
                for i in range(0, len(data), 64 * 1024):
                    chunk = data[i : i + 64 * 1024]
                    reply(b"DATA", len(chunk), chunk)
                reply(b"DONE", 0)
            else:
                fail(f"unsupported sync request {tag!r}")
                break
        stream.close()

    @staticmethod
    def _receive_file(stream: _Stream, path: Path, mode: int, fail) -> bool:
        chunks = []
        while True:
            header = stream.read_exact(8)
            if header is None:
                return False
            tag, length = header[:4], struct.unpack("<I", header[4:])[0]
            if tag == b"DONE":
                break
            if tag != b"DATA":
                fail(f"expected DATA, got {tag!r}")
                return False
            data = stream.read_exact(length)
            if data is None:
                return False
            chunks.append(data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"".join(chunks))
            os.chmod(path, stat.S_IMODE(mode) or 0o644)
        except OSError as exc:
            fail(f"{path}: {exc.strerror}")
            return True
        return True
