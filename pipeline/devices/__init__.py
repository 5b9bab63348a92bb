"""Devices: reach a board or phone (local, ssh, adb), profile .tflite files there, bring the figures back.

from pipeline.devices import parse_devices, profile_devices
runs = profile_devices({"int8": Path("model_int8.tflite")}, settings, parse_devices("pi@rpi5", target.transport))
"""

from pipeline.devices.profile_device import (
    DeviceRun,
    probe_device,
    profile_devices,
    profile_files,
    profile_many,
    profile_on_device,
)
from pipeline.devices.spec import DeviceSpec, from_profile, open_transport, parse_device, parse_devices
from pipeline.devices.ssh import SshOptions
from pipeline.devices.transport import Completed, LocalTransport, Transport

__all__ = [
    "Completed",
    "DeviceRun",
    "DeviceSpec",
    "LocalTransport",
    "SshOptions",
    "Transport",
    "from_profile",
    "open_transport",
    "parse_device",
    "parse_devices",
    "probe_device",
    "profile_devices",
    "profile_files",
    "profile_many",
    "profile_on_device",
]
