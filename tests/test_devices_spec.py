"""DEVICE strings: every accepted form, lists, profile defaults, and refusals that name the bad part."""

from __future__ import annotations

import sys

import pytest

from pipeline.devices.spec import DeviceSpec, from_profile, open_transport, parse_device, parse_devices
from pipeline.errors import UsageError
from pipeline.targets import load_target


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("pi@rpi5.local", DeviceSpec("ssh", host="rpi5.local", user="pi")),
        ("pi@10.0.0.7:2222", DeviceSpec("ssh", host="10.0.0.7", user="pi", port=2222)),
        ("mypi", DeviceSpec("ssh", host="mypi")),  # an ~/.ssh/config alias: ssh decides user and port
        ("mypi:22", DeviceSpec("ssh", host="mypi", port=22)),
        ("ssh://mendel@coral:2222", DeviceSpec("ssh", host="coral", user="mendel", port=2222)),
        ("ssh://coral", DeviceSpec("ssh", host="coral")),
        ("root@[::1]:2200", DeviceSpec("ssh", host="[::1]", user="root", port=2200)),
        ("adb:R58M1234ABC", DeviceSpec("adb", serial="R58M1234ABC", workdir="/data/local/tmp/edgeship")),
        ("adb:192.168.1.9:5555", DeviceSpec("adb", serial="192.168.1.9:5555", workdir="/data/local/tmp/edgeship")),
        ("local", DeviceSpec("local", python=sys.executable)),  # this machine: edgeship's own interpreter
    ],
)
def test_forms_without_a_profile(text: str, want: DeviceSpec) -> None:
    assert parse_device(text) == want


def test_names() -> None:
    assert [s.name for s in parse_devices("pi@a:2222,adb:X,local,b")] == ["pi@a:2222", "adb:X", "local", "b"]


def test_profile_gives_defaults_and_the_string_wins() -> None:
    rpi = load_target("rpi5").transport  # {kind: ssh, user: pi}
    assert parse_device("rpi5.local", rpi) == DeviceSpec("ssh", host="rpi5.local", user="pi")
    assert parse_device("me@rpi5.local:2200", rpi).user == "me"
    assert parse_device("rpi5.local", rpi).port is None  # the profile's default 22 is not forced over ssh config
    android = load_target("android").transport  # {kind: adb}
    assert parse_device("R58M1234ABC", android) == DeviceSpec("adb", serial="R58M1234ABC", workdir=android.workdir)
    assert parse_device("10.0.0.9:5555", android).kind == "adb"  # a bare serial under an adb profile
    assert parse_device("pi@rpi", android).kind == "ssh"  # user@host is ssh whatever the profile
    assert parse_devices("a, b ,c", rpi)[1] == DeviceSpec("ssh", host="b", user="pi")


def test_from_profile() -> None:
    from pipeline.targets import SshTransport

    section = SshTransport(kind="ssh", host="coral.local", user="mendel", port=2222, workdir="/home/mendel/es")
    spec = from_profile(section)
    assert (spec.host, spec.user, spec.port, spec.workdir) == ("coral.local", "mendel", 2222, "/home/mendel/es")
    assert from_profile(load_target("host").transport) == DeviceSpec("local", python=sys.executable)
    with pytest.raises(UsageError, match=r"names no host: give DEVICE=user@host"):
        from_profile(load_target("rpi5").transport, target="rpi5")


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("pi@host;reboot", "host 'host;reboot'"),
        ("pi@$(id)", "host '$(id)'"),
        ("p i@host", "user 'p i'"),
        ("-oProxyCommand=x@host", "user '-oProxyCommand=x'"),
        ("-oProxyCommand=x", "host '-oProxyCommand=x'"),
        ("pi@host:99999", "port '99999'"),
        ("pi@host:22x", "port '22x'"),
        ("adb:ser;ial", "adb serial 'ser;ial'"),
        ("adb:-s", "adb serial '-s'"),
        ("a,,b", "empty device name"),
        ("a,a", "a named more than once"),
    ],
)
def test_refusals_name_the_bad_part(text: str, part: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_devices(text)
    assert part in str(err.value) and repr(text) in str(err.value)


def test_open_transport_checks_python_and_workdir() -> None:
    with pytest.raises(UsageError, match="python"):
        open_transport(DeviceSpec("ssh", host="h", python="python3; reboot"))
    with pytest.raises(UsageError, match="workdir"):
        open_transport(DeviceSpec("ssh", host="h", workdir="relative/dir"))
    local = open_transport(DeviceSpec("local"))
    assert local.kind == "local" and local.run(["echo", "x;y"], timeout_s=10).stdout == "x;y\n"
