"""DEVICE strings -> device specs -> transports.

Accepted forms (comma-separated for several devices: `pi@a,pi@b`):
  `user@host`, `user@host:port`, `host`, `host:port`, `ssh://user@host:port`, `[::1]:2222`   -> SSH
  `adb:SERIAL`, or a bare serial when the target profile's transport is adb                 -> adb
  `local`                                                                                    -> this machine
The target profile's transport section gives the defaults (user, port, python, workdir); what the DEVICE
string says wins. Every part is checked against a strict character set and a bad part is named.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from pipeline.devices.ssh import HOST_RE, USER_RE, SshOptions
from pipeline.errors import UsageError

if TYPE_CHECKING:
    from pipeline.devices.transport import Transport

SERIAL_RE = re.compile(r"^[A-Za-z0-9._:][A-Za-z0-9._:-]*$")
PYTHON_RE = re.compile(r"^[A-Za-z0-9._/+-]+$")
WORKDIR_RE = re.compile(r"^/[A-Za-z0-9._/+-]*$")
SSH_WORKDIR = "/tmp/edgeship"
ADB_WORKDIR = "/data/local/tmp/edgeship"


@dataclass(frozen=True)
class DeviceSpec:
    kind: Literal["local", "ssh", "adb"]
    host: str | None = None  # ssh
    user: str | None = None  # ssh; None: the ssh config decides
    port: int | None = None  # ssh; None: the ssh config decides (22)
    serial: str | None = None  # adb; None: the only attached device
    python: str = "python3"
    workdir: str = SSH_WORKDIR

    @property
    def name(self) -> str:
        """A short name for reports and result keys: `pi@host:2222`, `adb:SERIAL`, `local`."""
        if self.kind == "local":
            return "local"
        if self.kind == "adb":
            return f"adb:{self.serial or 'default'}"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"{user}{self.host}{port}"


def _bad(text: str, part: str, what: str, allowed: str) -> UsageError:
    return UsageError(f"DEVICE {text!r}: the {what} {part!r} is not valid ({allowed})")


def _port(text: str, raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise _bad(text, raw, "port", "a number 1..65535")
    return int(raw)


def _profile_defaults(section: Any) -> dict[str, Any]:
    """Defaults from a targets.py transport section (LocalTransport / SshTransport / AdbTransport) or None."""
    if section is None:
        return {}
    kind = getattr(section, "kind", "local")
    out: dict[str, Any] = {"profile_kind": kind}
    if kind == "ssh":
        fields_set = getattr(section, "model_fields_set", {"port"})
        out.update(
            host=section.host,
            user=section.user,
            port=section.port if "port" in fields_set else None,
            python=section.python,
            workdir=section.workdir,
        )
    elif kind == "adb":
        out.update(serial=section.serial, workdir=section.workdir)
        out["python"] = getattr(section, "python", "python3")
    return out


def _parse_ssh(text: str, item: str, d: dict[str, Any]) -> DeviceSpec:
    rest = item[len("ssh://") :] if item.startswith("ssh://") else item
    user = d.get("user")
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        if not USER_RE.match(user):
            raise _bad(text, user, "user", "letters, digits, '.', '-', '_'")
    port = d.get("port")
    if rest.startswith("["):
        host, sep, tail = rest.partition("]")
        host += "]"
        if tail:
            if not tail.startswith(":"):
                raise _bad(text, tail, "port", "write [IPv6]:port")
            port = _port(text, tail[1:])
        del sep
    elif rest.count(":") == 1:
        host, raw = rest.split(":")
        port = _port(text, raw)
    else:
        host = rest
    if not HOST_RE.match(host):
        raise _bad(text, host, "host", "letters, digits, '.', '-', '_', or [IPv6]")
    python = d.get("python") or "python3"
    workdir = d.get("workdir") if d.get("profile_kind") == "ssh" else SSH_WORKDIR
    return DeviceSpec("ssh", host=host, user=user, port=port, python=python, workdir=workdir or SSH_WORKDIR)


def _adb(text: str, serial: str | None, d: dict[str, Any]) -> DeviceSpec:
    if serial is not None and not SERIAL_RE.match(serial):
        raise _bad(text, serial, "adb serial", "letters, digits, '.', ':', '-', '_'")
    workdir = d.get("workdir") if d.get("profile_kind") == "adb" else ADB_WORKDIR
    return DeviceSpec("adb", serial=serial, python=d.get("python") or "python3", workdir=workdir or ADB_WORKDIR)


def parse_device(item: str, transport_section: Any = None, *, whole: str | None = None) -> DeviceSpec:
    """One DEVICE string (no commas) merged with the profile's transport section."""
    text = whole if whole is not None else item
    d = _profile_defaults(transport_section)
    item = item.strip()
    if not item:
        raise UsageError(f"DEVICE {text!r}: an empty device name (two commas, or a trailing comma?)")
    if item == "local":
        return DeviceSpec("local", python=sys.executable)  # this machine: edgeship's own interpreter
    if item.startswith("adb:"):
        return _adb(text, item[4:] or None, d)
    if d.get("profile_kind") == "adb" and "@" not in item and not item.startswith("ssh://"):
        return _adb(text, item, d)
    return _parse_ssh(text, item, d)


def parse_devices(text: str, transport_section: Any = None) -> tuple[DeviceSpec, ...]:
    """A DEVICE string, possibly `a,b,c`, into specs (duplicates refused)."""
    specs = tuple(parse_device(part, transport_section, whole=text) for part in text.split(","))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"DEVICE {text!r}: {', '.join(dupes)} named more than once")
    return specs


def from_profile(transport_section: Any, *, target: str = "the target") -> DeviceSpec:
    """The device a profile names by itself (no DEVICE given)."""
    d = _profile_defaults(transport_section)
    kind = d.get("profile_kind", "local")
    if kind == "local":
        return DeviceSpec("local", python=sys.executable)
    if kind == "adb":
        return _adb("(profile)", d.get("serial"), d)
    if not d.get("host"):
        raise UsageError(
            f"{target} reaches its device over ssh but names no host: give DEVICE=user@host (or transport.host)"
        )
    spec = _parse_ssh("(profile)", d["host"], d)
    return replace(spec, user=d.get("user") or spec.user)


def open_transport(
    spec: DeviceSpec, *, ssh_options: SshOptions | None = None, adb: str = "adb", adb_server_port: int | None = None
) -> Transport:
    """A live transport for `spec` (close it when done)."""
    if spec.python and not PYTHON_RE.match(spec.python):
        raise UsageError(f"python {spec.python!r}: a command name or an absolute path")
    if not WORKDIR_RE.match(spec.workdir):
        raise UsageError(f"workdir {spec.workdir!r}: an absolute path of letters, digits, '.', '-', '_', '/'")
    if spec.kind == "local":
        from pipeline.devices.transport import LocalTransport

        return LocalTransport(python=spec.python)
    if spec.kind == "ssh":
        from pipeline.devices.ssh import SshTransport

        assert spec.host is not None
        return SshTransport(
            spec.host, user=spec.user, port=spec.port, python=spec.python, workdir=spec.workdir, options=ssh_options
        )
    from pipeline.devices.adb import AdbTransport

    return AdbTransport(spec.serial, adb=adb, server_port=adb_server_port, python=spec.python, workdir=spec.workdir)


def target_devices(req: Any) -> tuple[DeviceSpec, ...]:
    """The devices a deploy runs on: DEVICE when given, else the profile's own when it names one (ssh host, adb
    serial); none means this machine stands in (the profile and latency_table stages both use this)."""
    tr = req.target.transport
    if req.devices:
        return parse_devices(req.devices, tr)
    if (tr.kind == "ssh" and tr.host) or (tr.kind == "adb" and tr.serial):
        return (from_profile(tr, target=req.target.name),)
    return ()
