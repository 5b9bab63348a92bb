"""The SSH transport (Raspberry Pi, Coral Dev Board, any Linux board): the system `ssh`, argv lists only.

- The user's ssh configuration is honoured (host aliases, users, keys, ProxyJump); `-o BatchMode=yes` so that
  nothing ever waits for a password or a yes/no prompt.
- Host keys are checked: an unknown or changed key is refused with the command to fix it. Tests (and users who
  keep a separate file) may name an explicit known_hosts file and identity file.
- One connection per device: ControlMaster/ControlPath/ControlPersist multiplexing through a socket in a
  private temporary folder (short path: sockets are limited to ~100 bytes), closed by `close()`.
- Files travel over the same connection (`cat > path`, `cat path`), not scp: the remote path goes through
  the same quoting as every command, it works whether or not the device runs an SFTP server (scp in OpenSSH 9
  speaks SFTP) and reuses the multiplexed connection.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.devices.transport import Completed, run_process, shell_command, text
from pipeline.errors import DeviceError

log = logging.getLogger(__name__)

HOST_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])$")
USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SshOptions:
    """How to call ssh. Leave everything None to use the user's own ssh configuration."""

    known_hosts: Path | None = None  # an explicit UserKnownHostsFile
    identity: Path | None = None  # an explicit key (with IdentitiesOnly=yes)
    config_file: Path | None = None  # `ssh -F` (default: ~/.ssh/config)
    connect_timeout_s: int = 10
    alive_interval_s: int = 5  # a device that stops answering is noticed after ~3 intervals
    multiplex: bool = True
    persist_s: int = 120


class SshTransport:
    kind = "ssh"

    def __init__(
        self,
        host: str,
        *,
        user: str | None = None,
        port: int | None = None,
        python: str = "python3",
        workdir: str = "/tmp/edgeship",
        options: SshOptions | None = None,
    ) -> None:
        if shutil.which("ssh") is None:
            raise DeviceError("the ssh client is not installed here: apt-get install openssh-client (or your OS's)")
        if not HOST_RE.match(host):
            raise DeviceError(f"ssh host {host!r}: only letters, digits, '.', '-', '_' (or [IPv6]) are allowed")
        if user is not None and not USER_RE.match(user):
            raise DeviceError(f"ssh user {user!r}: only letters, digits, '.', '-', '_' are allowed")
        if port is not None and not 1 <= port <= 65535:
            raise DeviceError(f"ssh port {port}: must be 1..65535")
        self.host, self.user, self.port = host, user, port
        self.python, self.workdir = python, workdir
        self.options = options or SshOptions()
        self._control_dir: str | None = None
        if self.options.multiplex:
            self._control_dir = tempfile.mkdtemp(prefix="es-ssh-", dir="/tmp")  # mode 0700; short path

    # ------------------------------------------------------------------ argv

    @property
    def control_path(self) -> str | None:
        return None if self._control_dir is None else f"{self._control_dir}/cm"

    def _ssh_argv(self) -> list[str]:
        o = self.options
        argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={o.connect_timeout_s}"]
        argv += ["-o", f"ServerAliveInterval={o.alive_interval_s}", "-o", "ServerAliveCountMax=3"]
        if o.config_file is not None:
            argv += ["-F", str(o.config_file)]
        if o.known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={o.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if o.identity is not None:
            argv += ["-i", str(o.identity), "-o", "IdentitiesOnly=yes"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.user is not None:
            argv += ["-l", self.user]
        if self.control_path is not None:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}"]
            argv += ["-o", f"ControlPersist={o.persist_s}"]
        return argv

    def _host_arg(self) -> str:
        return self.host[1:-1] if self.host.startswith("[") else self.host

    # ------------------------------------------------------------------ Transport

    def run(self, argv: Sequence[str], *, timeout_s: float, stdin: bytes | None = None) -> Completed:
        return self._remote(
            shell_command(argv), tuple(argv), timeout_s=timeout_s, stdin=stdin, what=f"running {argv[0]}"
        )

    def push(self, local: Path, remote: str, *, timeout_s: float = 120.0) -> None:
        try:
            data = Path(local).read_bytes()
        except OSError as exc:
            raise DeviceError(f"cannot read {local} to copy it to {self.describe()}: {exc}") from None
        done = self._remote(
            f"cat > {shlex.quote(remote)}",
            ("push", remote),
            timeout_s=timeout_s,
            stdin=data,
            what=f"copying to {remote}",
        )
        if done.rc != 0:
            raise DeviceError(
                f"copying {Path(local).name} to {remote} on {self.describe()} failed: {done.stderr.strip()}"
            )

    def pull(self, remote: str, local: Path, *, timeout_s: float = 120.0) -> None:
        argv = [*self._ssh_argv(), "--", self._host_arg(), f"cat -- {shlex.quote(remote)}"]
        proc = run_process(argv, timeout_s=timeout_s, what=f"copying {remote} from {self.describe()}")
        self._raise_for_ssh(proc.returncode, text(proc.stderr), f"copying {remote} from")
        if proc.returncode != 0:
            raise DeviceError(f"copying {remote} from {self.describe()} failed: {text(proc.stderr).strip()}")
        Path(local).write_bytes(proc.stdout)

    def close(self) -> None:
        """Stop the multiplexing master (if one runs) and remove its private folder."""
        if self._control_dir is None:
            return
        if Path(self.control_path or "").exists():
            argv = [*self._ssh_argv(), "-O", "exit", "--", self._host_arg()]
            try:
                run_process(argv, timeout_s=15, what="closing the ssh connection")
            except DeviceError as exc:
                log.warning("%s", exc)
        shutil.rmtree(self._control_dir, ignore_errors=True)
        self._control_dir = None

    def multiplexed(self) -> bool:
        """Whether a master connection is up (`ssh -O check`)."""
        if self.control_path is None or not Path(self.control_path).exists():
            return False
        argv = [*self._ssh_argv(), "-O", "check", "--", self._host_arg()]
        return run_process(argv, timeout_s=10, what="checking the ssh master").returncode == 0

    def describe(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}{port}"

    def __enter__(self) -> SshTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _remote(
        self, command: str, shown: tuple[str, ...], *, timeout_s: float, stdin: bytes | None, what: str
    ) -> Completed:
        argv = [*self._ssh_argv(), "--", self._host_arg(), command]
        proc = run_process(argv, timeout_s=timeout_s, stdin=stdin, what=f"{what} on {self.describe()} (ssh)")
        err = text(proc.stderr)
        self._raise_for_ssh(proc.returncode, err, what + " on")
        return Completed(shown, proc.returncode, text(proc.stdout), err)

    def _raise_for_ssh(self, rc: int, stderr: str, doing: str) -> None:
        """Exit 255 is ssh's own failure, or the remote program's own 255: ssh's message tells which; without
        one (a multiplexed session whose master died prints nothing) a fresh `true` tells whether the device
        is still there."""
        if rc != 255:
            return
        error = ssh_error(stderr, self.describe(), doing=doing, host=self.host, port=self.port)
        if error is not None:
            raise error
        again = [*self._ssh_argv(), "--", self._host_arg(), "true"]
        wait = self.options.connect_timeout_s + 5
        probe = run_process(again, timeout_s=wait, what=f"reconnecting to {self.describe()}")
        if probe.returncode != 0:
            now = ssh_error(text(probe.stderr), self.describe(), doing="reconnecting to", host=self.host,
                            port=self.port)  # fmt: skip
            raise DeviceError(
                f"{doing} {self.describe()}: the connection to the device was lost (the device went away: rebooted, "
                f"lost its network or sshd stopped); {now or text(probe.stderr).strip()[-300:]}"
            )


_WENT_AWAY = (
    "closed by remote host",
    "connection reset",
    "broken pipe",
    "timeout, server",
    "connection closed by",
    "mux_client_request_session",
    "control socket connect",
    "session open refused",
)


def ssh_error(stderr: str, where: str, *, doing: str, host: str, port: int | None) -> DeviceError | None:
    """A DeviceError for ssh's own failure (exit 255), or None when the text is not one of ssh's."""
    low = stderr.lower()
    tail = stderr.strip()[-600:]
    target = f"{doing} {where}".strip()
    keyscan = f"ssh-keyscan {'-p ' + str(port) + ' ' if port else ''}{host}"
    if "remote host identification has changed" in low or ("host key for" in low and "has changed" in low):
        return DeviceError(
            f"{target}: the device's host key CHANGED since it was recorded in known_hosts. If the device was "
            f"reinstalled, remove the old key (ssh-keygen -R {host}) and connect once by hand to check the new "
            f"fingerprint; otherwise someone may be intercepting the connection. ssh said: {tail}"
        )
    if "host key verification failed" in low or ("no " in low and "host key is known" in low):
        return DeviceError(
            f"{target}: the device's host key is not in known_hosts, and edgeship never accepts keys blindly. "
            f"Connect once by hand (ssh {where}) and check the fingerprint, or compare `{keyscan}` with the "
            f"device's /etc/ssh/ssh_host_*.pub and add it to ~/.ssh/known_hosts. ssh said: {tail}"
        )
    if "permission denied" in low:
        return DeviceError(
            f"{target}: the device refused the login (key not accepted). Install your public key on it "
            f"(ssh-copy-id {where}), check the user name (DEVICE=user@host), or name the key in ~/.ssh/config. "
            f"ssh said: {tail}"
        )
    if "could not resolve hostname" in low or "name or service not known" in low:
        return DeviceError(f"{target}: the host name {host!r} does not resolve; check DEVICE or ~/.ssh/config")
    if "connection refused" in low:
        return DeviceError(
            f"{target}: nothing accepts ssh connections there (connection refused): is the device on, is sshd "
            f"running on it (sudo systemctl enable --now ssh), is the port right?"
        )
    if any(s in low for s in ("timed out", "no route to host", "network is unreachable", "host is down")):
        return DeviceError(
            f"{target}: the device is unreachable ({tail.splitlines()[-1] if tail else 'no answer'}); check that "
            "it is powered, on the same network and that the address is right"
        )
    if any(s in low for s in _WENT_AWAY):
        return DeviceError(
            f"{target}: the connection to the device was lost (the device went away: rebooted, lost its network "
            f"or sshd stopped). ssh said: {tail}"
        )
    if not tail or tail.startswith(("ssh:", "kex_", "Connection", "Bad", "Unable", "banner")):
        return DeviceError(f"{target}: ssh failed (exit 255): {tail or 'no message'}")
    return None
