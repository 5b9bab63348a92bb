"""The adb transport (Android): the system `adb` client, argv lists only, `adb -s SERIAL`.

- Commands go through `adb shell` as one string with every argument quoted. The exit status is read from a
  marker the command prints last (`__edgeship_rc=N`): `adb shell` returns the remote status only with the
  shell v2 protocol (Android 7+); older devices always give 0.
- Files use `adb push` / `adb pull` (the sync protocol: no shell touches the path).
- A TCP serial (`host:port`) is attached with `adb connect` first; `adb connect` to a closed port prints
  "Connection refused" and still exits 0, so its text is what is checked.
- Real Android has no Python: the device-side runner needs one (e.g. Termux), or use TFLite's
  `benchmark_model` binary (pipeline/devices/benchmark_model.py).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.devices.transport import Completed, run_process, shell_command, text
from pipeline.errors import DeviceError

log = logging.getLogger(__name__)

SERIAL_RE = re.compile(r"^[A-Za-z0-9._:][A-Za-z0-9._:-]*$")
RC_MARK = "__edgeship_rc="
_RC_TAIL = re.compile(r"\r?\n" + RC_MARK + r"(\d+)\r?\n?$")
TCP_SERIAL = re.compile(r"^[A-Za-z0-9._-]+:\d+$")
INSTALL_ADB = (
    "install the adb client (Debian/Ubuntu: apt-get install adb; elsewhere Android SDK platform-tools) "
    "and put it on PATH"
)


class AdbTransport:
    kind = "adb"

    def __init__(
        self,
        serial: str | None,
        *,
        adb: str = "adb",
        server_port: int | None = None,
        python: str = "python3",
        workdir: str = "/data/local/tmp/edgeship",
        connect_timeout_s: float = 20.0,
    ) -> None:
        if serial is not None and not SERIAL_RE.match(serial):
            raise DeviceError(f"adb serial {serial!r}: only letters, digits, '.', ':', '-', '_' are allowed")
        found = shutil.which(adb)
        if found is None:
            raise DeviceError(f"adb client {adb!r} not found: {INSTALL_ADB}")
        self.adb, self.serial, self.server_port = found, serial, server_port
        self.python, self.workdir = python, workdir
        self.connect_timeout_s = connect_timeout_s
        self._ready = False
        self._connected_by_us = False

    # ------------------------------------------------------------------ argv

    def _argv(self, *args: str, device: bool = True) -> list[str]:
        argv = [self.adb]
        if self.server_port is not None:
            argv += ["-P", str(self.server_port)]
        if device and self.serial is not None:
            argv += ["-s", self.serial]
        return [*argv, *args]

    def _adb(self, *args: str, timeout_s: float, stdin: bytes | None = None, device: bool = True, what: str):
        return run_process(self._argv(*args, device=device), timeout_s=timeout_s, stdin=stdin, what=what)

    # ------------------------------------------------------------------ attach

    def connect(self) -> None:
        """Wait until the device is usable; a TCP serial (host:port) that adb does not know yet is attached with
        `adb connect` first."""
        state, err = self._state()
        if state != "device" and self.serial is not None and TCP_SERIAL.match(self.serial) and "not found" in err:
            self._adb_connect()
            state, err = self._state()
        deadline = time.monotonic() + self.connect_timeout_s
        while state != "device":
            if time.monotonic() > deadline or "offline" not in err.lower():
                raise adb_error(err, self.describe(), doing="attaching") or DeviceError(
                    f"adb: {self.describe()} is not ready ({err.strip() or state!r})"
                )
            time.sleep(0.3)
            state, err = self._state()
        self._ready = True

    def _state(self) -> tuple[str, str]:
        proc = self._adb("get-state", timeout_s=self.connect_timeout_s, what=f"adb get-state on {self.describe()}")
        state = text(proc.stdout).strip()
        return (state if proc.returncode == 0 else ""), text(proc.stderr) + (state if proc.returncode else "")

    def _adb_connect(self) -> None:
        assert self.serial is not None
        proc = self._adb("connect", self.serial, timeout_s=self.connect_timeout_s + 15, device=False,
                         what=f"adb connect {self.serial}")  # fmt: skip
        out = (text(proc.stdout) + text(proc.stderr)).strip()
        low = out.lower()
        if "authenticate" in low:  # "failed to authenticate to X": the phone's prompt was not accepted
            raise adb_error("unauthorized", self.describe(), doing="attaching") or DeviceError(out)
        if proc.returncode != 0 or any(s in low for s in ("failed", "unable", "refused", "cannot")):
            raise DeviceError(
                f"adb connect {self.serial} failed: {out or 'no message'}. Is the phone on the network with "
                "wireless debugging (or `adb tcpip 5555`) enabled, and is the address right?"
            )
        self._connected_by_us = True

    def _ensure(self) -> None:
        if not self._ready:
            self.connect()

    # ------------------------------------------------------------------ Transport

    def run(self, argv: Sequence[str], *, timeout_s: float, stdin: bytes | None = None) -> Completed:
        self._ensure()
        command = f"{shell_command(argv)}; printf '\\n{RC_MARK}%s\\n' \"$?\""
        proc = self._adb("shell", command, timeout_s=timeout_s, stdin=stdin,
                         what=f"running {argv[0]} on {self.describe()}")  # fmt: skip
        out, err = text(proc.stdout), text(proc.stderr)
        m = _RC_TAIL.search(out)
        if m is None:
            known = adb_error(err + out, self.describe(), doing=f"running {argv[0]} on")
            if known is not None:
                raise known
            try:
                state, now = self._state()
            except DeviceError as exc:
                state, now = "", str(exc)
            raise DeviceError(
                f"running {argv[0]} on {self.describe()}: the command did not finish (adb exit {proc.returncode}): "
                f"the device went away (unplugged, rebooted, or its adbd stopped); adb now says: "
                f"{(now or state).strip()[-200:]}. Output before it ended: {(err + out).strip()[-400:] or 'none'}"
            )
        return Completed(tuple(argv), int(m.group(1)), out[: m.start()], err)

    def push(self, local: Path, remote: str, *, timeout_s: float = 120.0) -> None:
        self._ensure()
        proc = self._adb("push", str(Path(local).resolve()), remote, timeout_s=timeout_s,
                         what=f"adb push to {self.describe()}")  # fmt: skip
        if proc.returncode != 0:
            out = text(proc.stderr) + text(proc.stdout)
            raise adb_error(out, self.describe(), doing=f"copying {Path(local).name} to") or DeviceError(
                f"adb push {Path(local).name} -> {remote} on {self.describe()} failed: {out.strip()[-500:]}"
            )

    def pull(self, remote: str, local: Path, *, timeout_s: float = 120.0) -> None:
        self._ensure()
        proc = self._adb("pull", remote, str(Path(local).resolve()), timeout_s=timeout_s,
                         what=f"adb pull from {self.describe()}")  # fmt: skip
        if proc.returncode != 0:
            out = text(proc.stderr) + text(proc.stdout)
            raise adb_error(out, self.describe(), doing=f"copying {remote} from") or DeviceError(
                f"adb pull {remote} from {self.describe()} failed: {out.strip()[-500:]}"
            )

    def close(self) -> None:
        if self._connected_by_us and self.serial is not None:
            try:
                self._adb("disconnect", self.serial, timeout_s=10, device=False, what="adb disconnect")
            except DeviceError as exc:
                log.warning("%s", exc)
        self._ready = self._connected_by_us = False

    def describe(self) -> str:
        return f"adb:{self.serial}" if self.serial else "adb (the only attached device)"

    def __enter__(self) -> AdbTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def adb_error(output: str, where: str, *, doing: str) -> DeviceError | None:
    """A DeviceError for one of adb's own failures, or None when the text is not one of them."""
    low = output.lower()
    tail = output.strip()[-400:]
    target = f"{doing} {where}".strip()
    if "no devices/emulators found" in low or "no devices found" in low:
        return DeviceError(
            f"{target}: no Android device is attached. Plug it in with USB debugging on (Settings > Developer "
            "options), accept the prompt on the phone, and check `adb devices`; or give DEVICE=adb:host:port"
        )
    if "unauthorized" in low:
        return DeviceError(
            f"{target}: the device has not authorized this computer. Unlock the phone and accept "
            "'Allow USB debugging?' (tick 'Always allow'), then retry; `adb devices` must say 'device'"
        )
    if "offline" in low:
        return DeviceError(
            f"{target}: the device is offline. Reconnect the cable (or `adb reconnect`), unlock the phone, and "
            "check `adb devices`"
        )
    if "more than one device" in low:
        return DeviceError(f"{target}: several devices are attached; choose one with DEVICE=adb:SERIAL (`adb devices`)")
    if "not found" in low and "device" in low:
        return DeviceError(f"{target}: that device is not attached (`adb devices` lists the serials). adb said: {tail}")
    if any(s in low for s in ("error: closed", "protocol fault", "connection reset", "broken pipe", "device still")):
        return DeviceError(
            f"{target}: the connection to the device was lost (it went away: unplugged, rebooted or its adbd "
            f"stopped). adb said: {tail}"
        )
    if "cannot connect to daemon" in low or "failed to start daemon" in low:
        return DeviceError(f"{target}: the adb server would not start here: {tail}. Try `adb kill-server`.")
    return None
