"""Power and energy while a model runs, read on the device itself. Standard library only, Python 3.7+.

This file is copied to devices beside ``bench_runner.py`` and imported by it: it must not import edgeship.
The whole hook is one import and two calls::

    import power_sampler
    idle = power_sampler.measure_idle(kind, 5.0, options=opts)      # before warm-up, device at rest
    with power_sampler.Sampler(kind, options=opts) as sampler:       # around the timed loop only
        ...
    result["power"] = {"idle": idle, "active": sampler.result()}

Sources, chosen by the target profile's ``power.kind``:

- ``rpi5_pmic``: ``vcgencmd pmic_read_adc`` on a Raspberry Pi 5; power = sum over rails of V*I (an ``X_A
  current(n)=...A`` line paired with its ``X_V volt(m)=...V`` line; EXT5V_V and BATT_V have a voltage only),
  then ``gain * sum + offset_w`` (options) because the PMIC rails miss the board's conversion losses.
- ``hwmon``: an INA219/INA226/INA260 (Linux ina2xx driver) under /sys/class/hwmon, found by its ``name``;
  power1_input (uW), else in1_input (mV, bus) * curr1_input (mA).
- ``android_battery``: /sys/class/power_supply/battery/{current_now (uA), voltage_now (uV), status}; the sign of
  current_now differs between vendors, so power is |I|*V and the sign seen is reported.
- ``odpm``: Pixel on-device power monitors, cumulative energy per rail. Read from the kernel's iio
  ``energy_value`` (``t=<ms>`` then ``CH<n>(T=<ms>)[<rail>], <uWs>``) where readable, else from
  ``dumpsys android.hardware.power.stats.IPowerStats/default`` (``[<rail>]:<subsystem>  <x.xx> mWs`` per rail,
  no timestamp: the time of the call is used). Power = delta energy / delta time.
- ``rapl``: /sys/class/powercap/intel-rapl:N/energy_uj (cumulative uJ, wraps at max_energy_range_uj).

Instantaneous sources are sampled in a background thread; cumulative counters are read at start and stop (and,
with rate_hz > 0, in between, which also catches RAPL wrap-arounds). Every result is a plain dict that states
its units, what was read, how often, and what went wrong.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

KINDS = ("none", "rpi5_pmic", "hwmon", "android_battery", "odpm", "rapl")
DEFAULT_RATE_HZ = {"none": 0.0, "rpi5_pmic": 10.0, "hwmon": 50.0, "android_battery": 10.0, "odpm": 0.0, "rapl": 10.0}
INA_NAMES = ("ina219", "ina220", "ina226", "ina230", "ina231", "ina234", "ina260", "ina2xx")
PMIC_COMMAND = ("vcgencmd", "pmic_read_adc")
ODPM_DUMPSYS = ("dumpsys", "android.hardware.power.stats.IPowerStats/default")
UNITS = {"power": "W", "energy": "J", "time": "s", "rate": "Hz"}
MAX_ERRORS = 5

if TYPE_CHECKING:  # aliases for annotations only: `X | None` is not evaluable at run time on Python 3.9
    Runner = Callable[[Sequence[str]], str]
    # channel -> (time in s, cumulative energy in J, wrap-around range in J or None)
    CounterReading = dict[str, tuple[float, float, float | None]]


class PowerSourceError(Exception):
    """The power source named by power.kind is missing or unreadable on this device."""


def run_command(argv: Sequence[str], timeout: float = 10.0) -> str:
    """Run argv (no shell) and return its stdout; a missing command, a timeout or a non-zero exit raise."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise PowerSourceError(f"{argv[0]}: command not found on this device") from None
    except subprocess.TimeoutExpired:
        raise PowerSourceError(f"{' '.join(argv)} did not answer within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-300:]
        raise PowerSourceError(f"{' '.join(argv)} exited {proc.returncode}: {tail}")
    return proc.stdout


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_int(path: str) -> int:
    return int(_read(path).strip())


def _sys(root: str, *parts: str) -> str:
    return os.path.join(root, "sys", *parts)


def _by_number(path: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", os.path.basename(path))
    return (int(digits[-1]) if digits else -1, path)


# ---------------------------------------------------------------- Raspberry Pi 5 PMIC


_PMIC_LINE = re.compile(
    r"^\s*(?P<rail>\S+)_(?P<q>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)(?P<unit>[AV])\s*$"
)


def parse_pmic_adc(text: str) -> dict[str, Any]:
    """``vcgencmd pmic_read_adc`` text -> {"rails": {rail: W}, "total_w", "unpaired": [rails with V or A only]}."""
    volts: dict[str, float] = {}
    amps: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m and m.group("q") == m.group("unit"):
            (amps if m.group("q") == "A" else volts)[m.group("rail")] = float(m.group("value"))
    rails = {rail: volts[rail] * amps[rail] for rail in sorted(amps) if rail in volts}
    unpaired = sorted((set(volts) | set(amps)) - set(rails))
    return {"rails": rails, "total_w": sum(rails.values()), "unpaired": unpaired}


class PmicSource:
    kind = "rpi5_pmic"
    counter = False

    def __init__(self, run: Runner, *, command: Sequence[str] = PMIC_COMMAND, gain: float = 1.0, offset_w: float = 0.0):
        self.run, self.command, self.gain, self.offset_w = run, tuple(command), float(gain), float(offset_w)
        self.source = " ".join(self.command)
        self.units = "pmic_read_adc: current A, volt V per rail; W = gain * sum(V*I) + offset_w"
        self.rail_sums: dict[str, float] = {}
        self.reads = 0
        self.read()  # fail here, with what is missing, rather than in the sampling thread
        self.rail_sums, self.reads = {}, 0

    def read(self) -> float:
        try:
            text = self.run(self.command)
        except PowerSourceError as exc:
            if "command not found" in str(exc):
                raise PowerSourceError(
                    f"{exc}; power.kind: rpi5_pmic needs Raspberry Pi OS's vcgencmd on a Raspberry Pi 5"
                ) from None
            raise PowerSourceError(f"{exc} (vcgencmd needs /dev/vcio: is the user in the video group?)") from None
        parsed = parse_pmic_adc(text)
        if not parsed["rails"]:
            raise PowerSourceError(
                f"{self.source} printed no rail with both a current and a voltage (got {text.strip()[:120]!r}); "
                "only the Raspberry Pi 5's PMIC has these ADCs"
            )
        for rail, watts in parsed["rails"].items():
            self.rail_sums[rail] = self.rail_sums.get(rail, 0.0) + watts
        self.reads += 1
        return self.gain * parsed["total_w"] + self.offset_w

    def warnings(self, avg_w: float | None) -> list[str]:
        if self.gain == 1.0 and self.offset_w == 0.0:
            return [
                "uncalibrated: the PMIC rails' sum misses the board's conversion losses and under-reads its total "
                "(set the profile's power gain/offset_w from a USB power meter)"
            ]
        return []

    def extra(self) -> dict[str, Any]:
        n = max(self.reads, 1)
        return {
            "calibration": {"gain": self.gain, "offset_w": self.offset_w},
            "rail_avg_w": {rail: round(total / n, 6) for rail, total in sorted(self.rail_sums.items())},
        }


# ---------------------------------------------------------------- INA2xx through hwmon


def find_ina_hwmon(root: str = "/", names: Sequence[str] = INA_NAMES) -> list[tuple[str, str]]:
    """Every /sys/class/hwmon/hwmonN whose ``name`` is one of names: [(dir, name)], in hwmon order."""
    found = []
    for name_file in sorted(glob.glob(_sys(root, "class", "hwmon", "*", "name")), key=_by_number):
        try:
            name = _read(name_file).strip()
        except OSError:
            continue
        if name in names:
            found.append((os.path.dirname(name_file), name))
    return found


def read_hwmon_power(hwmon_dir: str) -> tuple[float, str]:
    """Watts from one ina2xx hwmon dir: power1_input (uW), else in1_input (mV) * curr1_input (mA)."""
    power_file = os.path.join(hwmon_dir, "power1_input")
    if os.path.exists(power_file):
        return _read_int(power_file) / 1e6, "power1_input"
    millivolts = _read_int(os.path.join(hwmon_dir, "in1_input"))
    milliamps = _read_int(os.path.join(hwmon_dir, "curr1_input"))
    return abs(millivolts * milliamps) / 1e6, "in1_input*curr1_input"


class HwmonSource:
    kind = "hwmon"
    counter = False

    def __init__(self, root: str = "/", *, name: str | None = None):
        wanted = (name,) if name else INA_NAMES
        found = find_ina_hwmon(root, wanted)
        if not found:
            raise PowerSourceError(
                f"no {_sys(root, 'class', 'hwmon', '*', 'name')} matching {'/'.join(wanted)} on this device; "
                "power.kind: hwmon needs an INA219/226/260 with the ina2xx driver bound (a device-tree overlay, "
                "or e.g. `echo ina226 0x40 > /sys/bus/i2c/devices/i2c-1/new_device`)"
            )
        self.dir, self.chip = found[0]
        self.others = [d for d, _ in found[1:]]
        _, how = read_hwmon_power(self.dir)
        self.source = f"{self.dir} ({self.chip}, {how})"
        self.units = "power1_input uW" if how == "power1_input" else "in1_input mV * curr1_input mA"

    def read(self) -> float:
        return read_hwmon_power(self.dir)[0]

    def extra(self) -> dict[str, Any]:
        return {"other_sensors": self.others} if self.others else {}


# ---------------------------------------------------------------- Android battery fuel gauge


_CURRENT_SCALE = {"uA": 1e-6, "mA": 1e-3}
_VOLTAGE_SCALE = {"uV": 1e-6, "mV": 1e-3}


def read_battery(supply_dir: str, *, current_unit: str = "uA", voltage_unit: str = "uV") -> dict[str, Any]:
    """One fuel-gauge reading: current and voltage as the kernel reports them, and |I|*V in W.

    The kernel ABI says current_now is in uA and negative while discharging, but vendors differ (some report
    discharge as positive, some only positive values); power is therefore |I|*V and the raw sign is kept."""
    current = _read_int(os.path.join(supply_dir, "current_now"))
    voltage = _read_int(os.path.join(supply_dir, "voltage_now"))
    status_file = os.path.join(supply_dir, "status")
    status = _read(status_file).strip() if os.path.exists(status_file) else "Unknown"
    amps = current * _CURRENT_SCALE[current_unit]
    volts = voltage * _VOLTAGE_SCALE[voltage_unit]
    return {"current_raw": current, "voltage_raw": voltage, "status": status, "watts": abs(amps) * volts}


class BatterySource:
    kind = "android_battery"
    counter = False

    def __init__(self, root: str = "/", *, supply: str = "battery", current_unit: str = "uA", voltage_unit: str = "uV"):
        if current_unit not in _CURRENT_SCALE or voltage_unit not in _VOLTAGE_SCALE:
            raise PowerSourceError(
                f"current_unit must be uA or mA and voltage_unit uV or mV, got {current_unit}, {voltage_unit}"
            )
        self.dir = _sys(root, "class", "power_supply", supply)
        if not os.path.exists(os.path.join(self.dir, "current_now")):
            supplies = sorted(os.listdir(os.path.dirname(self.dir))) if os.path.isdir(os.path.dirname(self.dir)) else []
            raise PowerSourceError(
                f"no {os.path.join(self.dir, 'current_now')} on this device (power supplies here: "
                f"{', '.join(supplies) or 'none'}); power.kind: android_battery needs the battery fuel gauge"
            )
        self.current_unit, self.voltage_unit = current_unit, voltage_unit
        self.source = f"{self.dir}/{{current_now,voltage_now,status}}"
        self.units = f"current_now {current_unit}, voltage_now {voltage_unit}; W = |I| * V"
        self.statuses: dict[str, int] = {}
        self.signs = {"negative": 0, "positive": 0}

    def read(self) -> float:
        r = read_battery(self.dir, current_unit=self.current_unit, voltage_unit=self.voltage_unit)
        self.statuses[r["status"]] = self.statuses.get(r["status"], 0) + 1
        if r["current_raw"]:
            self.signs["negative" if r["current_raw"] < 0 else "positive"] += 1
        return r["watts"]

    def extra(self) -> dict[str, Any]:
        sign = None
        if self.statuses.get("Discharging") and any(self.signs.values()):
            sign = (
                "negative while discharging"
                if self.signs["negative"] >= self.signs["positive"]
                else ("positive while discharging")
            )
        return {"battery_status": dict(self.statuses), "current_sign": sign}

    def warnings(self, avg_w: float | None) -> list[str]:
        out = []
        other = {s: n for s, n in self.statuses.items() if s != "Discharging"}
        if other:
            out.append(
                f"battery status was {', '.join(sorted(other))} for {sum(other.values())} of "
                f"{sum(self.statuses.values())} readings: while a charger or USB feeds the phone, the battery "
                "current is not the phone's draw; unplug (or use wireless adb) for a true figure"
            )
        if avg_w is not None and not 0.05 <= avg_w <= 30:
            out.append(
                f"{avg_w:.3g} W is implausible for a phone: current_now may not be in {self.current_unit} here "
                "(set options current_unit: mA if this device reports mA)"
            )
        return out


# ---------------------------------------------------------------- Pixel ODPM


_ODPM_VALUE = re.compile(r"^CH(?P<ch>\d+)\(T=(?P<dur>\d+)\)\[(?P<rail>[^\]]+)\],\s*(?P<uws>\d+)\s*$")
_ODPM_DUMP_HEADER = "PowerStats HAL 2.0 energy meter"
_ODPM_DUMP_LINE = re.compile(
    r"^\s*(?P<channel>\S+)\s+(?P<mws>-?\d+(?:\.\d+)?)\s+mWs(?:\s+\(\s*(?P<delta>-?\d+(?:\.\d+)?)\s*\))?\s*$"
)


def parse_odpm_energy_value(text: str) -> tuple[int, dict[str, int]]:
    """iio ``energy_value`` -> (timestamp ms since boot, {rail: cumulative uWs})."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("t="):
        raise PowerSourceError(f"ODPM energy_value does not start with t=<ms>: {text[:80]!r}")
    rails = {}
    for line in lines[1:]:
        m = _ODPM_VALUE.match(line)
        if not m:
            raise PowerSourceError(f"unexpected ODPM energy_value line: {line!r}")
        rails[m.group("rail")] = int(m.group("uws"))
    return int(lines[0][2:]), rails


def parse_odpm_dumpsys(text: str) -> dict[str, float]:
    """The PowerStats HAL dump's energy-meter table -> {"[rail]:subsystem": cumulative uWs}.

    The HAL prints ``float(energyUWs) / 1000`` with %.2f mWs: a float32, so a counter of 1e10 uWs is only good to
    about 1 mWs. ``Elapsed time`` (delta mode) is ignored: deltas are taken between two reads."""
    rails: dict[str, float] = {}
    inside = False
    for line in text.splitlines():
        if _ODPM_DUMP_HEADER in line:
            inside = "End of" not in line
            continue
        if not inside:
            continue
        m = _ODPM_DUMP_LINE.match(line)
        if m:
            rails[m.group("channel")] = float(m.group("mws")) * 1000.0
    if not rails:
        raise PowerSourceError(
            "no 'PowerStats HAL 2.0 energy meter' table with mWs rows in the dumpsys output; this device's "
            "power.stats HAL reports no energy meters (ODPM is on Pixel 6 and later)"
        )
    return rails


def find_odpm_iio(root: str = "/") -> list[str]:
    """iio devices whose name mentions odpm (s2mpg10-odpm, s2mpg11-odpm, ...)."""
    found = []
    for name_file in sorted(glob.glob(_sys(root, "bus", "iio", "devices", "iio:device*", "name")), key=_by_number):
        try:
            if "odpm" in _read(name_file):
                found.append(os.path.dirname(name_file))
        except OSError:
            continue
    return found


def _wanted(rail: str, rails: Sequence[str] | None) -> bool:
    return not rails or any(r in rail for r in rails)


class OdpmIioSource:
    kind = "odpm"
    counter = True

    def __init__(self, root: str = "/", *, rails: Sequence[str] | None = None):
        self.devices = find_odpm_iio(root)
        if not self.devices:
            raise PowerSourceError(f"no {_sys(root, 'bus', 'iio', 'devices', 'iio:device*')} named *odpm* here")
        self.rails = rails
        for device in self.devices:  # fail now, not in the sampling thread, when energy_value is unreadable
            try:
                _read(os.path.join(device, "energy_value"))
            except OSError as exc:
                raise PowerSourceError(f"{device}/energy_value: {exc.strerror}") from None
        self.source = ", ".join(os.path.join(d, "energy_value") for d in self.devices)
        self.units = "energy_value: t ms since boot, energy uWs per rail"

    def read(self) -> CounterReading:
        out: CounterReading = {}
        for device in self.devices:
            t_ms, rails = parse_odpm_energy_value(_read(os.path.join(device, "energy_value")))
            for rail, uws in rails.items():
                if _wanted(rail, self.rails):
                    out[f"{os.path.basename(device)}:{rail}"] = (t_ms / 1000.0, uws / 1e6, None)
        return out


class OdpmDumpsysSource:
    kind = "odpm"
    counter = True

    def __init__(self, run: Runner, *, command: Sequence[str] = ODPM_DUMPSYS, rails: Sequence[str] | None = None):
        self.run, self.command, self.rails = run, tuple(command), rails
        self.source = " ".join(self.command)
        self.units = "dumpsys: cumulative mWs per rail (float32, %.2f); time of the call"
        self.read()

    def read(self) -> CounterReading:
        t0 = time.monotonic()
        text = self.run(self.command)
        t = (t0 + time.monotonic()) / 2
        return {
            rail: (t, uws / 1e6, None) for rail, uws in parse_odpm_dumpsys(text).items() if _wanted(rail, self.rails)
        }


# ---------------------------------------------------------------- Intel RAPL


def find_rapl_zones(root: str = "/", names: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Top-level powercap zones intel-rapl:N as [(dir, name)]; by default only package-* (psys overlaps them)."""
    zones = []
    for zone in sorted(glob.glob(_sys(root, "class", "powercap", "intel-rapl:*")), key=_by_number):
        if os.path.basename(zone).count(":") != 1:
            continue  # intel-rapl:0:0 and deeper are parts of a package
        try:
            name = _read(os.path.join(zone, "name")).strip()
        except OSError:
            continue
        if (names and name in names) or (not names and name.startswith("package")):
            zones.append((zone, name))
    return zones


def counter_delta(before: float, after: float, wrap: float | None) -> float | None:
    """after - before for a cumulative counter; one wrap-around at ``wrap`` is undone; None when it went back."""
    delta = after - before
    if delta >= 0:
        return delta
    if wrap:
        return delta + wrap
    return None


class RaplSource:
    kind = "rapl"
    counter = True

    def __init__(self, root: str = "/", *, zones: Sequence[str] | None = None):
        self.zones = find_rapl_zones(root, zones)
        if not self.zones:
            raise PowerSourceError(
                f"no {_sys(root, 'class', 'powercap', 'intel-rapl:*')} zone named "
                f"{'/'.join(zones) if zones else 'package-*'} here; power.kind: rapl needs an x86 CPU with the "
                "intel_rapl powercap driver"
            )
        self.wrap = {}
        for zone, _ in self.zones:
            try:
                self.wrap[zone] = _read_int(os.path.join(zone, "max_energy_range_uj")) / 1e6
                _read_int(os.path.join(zone, "energy_uj"))
            except PermissionError:
                raise PowerSourceError(
                    f"{zone}/energy_uj is readable by root only (Linux 5.10+, CVE-2020-8694); run the benchmark "
                    "as root or make the file readable"
                ) from None
        self.source = ", ".join(f"{zone}/energy_uj ({name})" for zone, name in self.zones)
        self.units = "energy_uj uJ, wraps at max_energy_range_uj"

    def read(self) -> CounterReading:
        t = time.monotonic()
        return {
            name: (t, _read_int(os.path.join(zone, "energy_uj")) / 1e6, self.wrap[zone]) for zone, name in self.zones
        }


# ---------------------------------------------------------------- choosing a source


def open_source(kind: str, options: dict[str, Any] | None = None) -> Any:
    """The source for kind, checked once (raises PowerSourceError with what is missing and what it needs)."""
    opts = dict(options or {})
    root = opts.get("root", "/")
    run: Runner = opts.get("run") or run_command
    if kind == "rpi5_pmic":
        return PmicSource(
            run,
            command=opts.get("command", PMIC_COMMAND),
            gain=opts.get("gain", 1.0),
            offset_w=opts.get("offset_w", 0.0),
        )
    if kind == "hwmon":
        return HwmonSource(root, name=opts.get("name"))
    if kind == "android_battery":
        return BatterySource(
            root,
            supply=opts.get("supply", "battery"),
            current_unit=opts.get("current_unit", "uA"),
            voltage_unit=opts.get("voltage_unit", "uV"),
        )
    if kind == "odpm":
        return _open_odpm(root, run, opts)
    if kind == "rapl":
        return RaplSource(root, zones=opts.get("zones"))
    if kind == "none":
        raise PowerSourceError("power.kind: none reads no sensor")
    raise ValueError(f"unknown power kind {kind!r}; one of {', '.join(KINDS)}")


def _open_odpm(root: str, run: Runner, opts: dict[str, Any]) -> Any:
    how = opts.get("odpm_source", "auto")
    problems = []
    if how in ("auto", "iio"):
        try:
            return OdpmIioSource(root, rails=opts.get("rails"))
        except PowerSourceError as exc:
            if how == "iio":
                raise
            problems.append(str(exc))
    try:
        return OdpmDumpsysSource(run, command=opts.get("command", ODPM_DUMPSYS), rails=opts.get("rails"))
    except PowerSourceError as exc:
        problems.append(str(exc))
    raise PowerSourceError("power.kind: odpm found no on-device power monitor: " + "; ".join(problems))


# ---------------------------------------------------------------- the sampler


class Sampler:
    """Sample power while a block runs: ``with Sampler("hwmon") as s: ...; s.result()``.

    A missing or unreadable source never raises here (unless strict=True): the result says ok: false and why, so
    a benchmark still finishes without power figures."""

    def __init__(
        self,
        kind: str,
        rate_hz: float | None = None,
        options: dict[str, Any] | None = None,
        *,
        strict: bool = False,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown power kind {kind!r}; one of {', '.join(KINDS)}")
        self.kind = kind
        self.rate_hz = DEFAULT_RATE_HZ[kind] if rate_hz is None else float(rate_hz)
        self.options = dict(options or {})
        self.strict = strict
        self._source: Any = None
        self._errors: list[str] = []
        self._read_errors = 0
        self._points: list[tuple[float, Any]] = []  # (time, watts) or (time, CounterReading)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_cpu_s = 0.0
        self._t_start = self._t_stop = 0.0
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Sampler:
        if self.kind != "none":
            try:
                self._source = open_source(self.kind, self.options)
            except PowerSourceError as exc:
                if self.strict:
                    raise
                self._errors.append(str(exc))
        self._t_start = time.monotonic()
        if self._source is not None:
            self._sample()
            if self.rate_hz > 0:
                self._thread = threading.Thread(target=self._loop, name="power-sampler", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        if self._result is None:
            if not self._t_start:  # stopped without being started
                self._t_start = time.monotonic()
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=15.0)
            if self._source is not None:
                self._sample()
            self._t_stop = time.monotonic()
            self._result = self._summarize()
        return self._result

    def result(self) -> dict[str, Any]:
        """The summary (stops sampling first if still running)."""
        return self.stop()

    def _loop(self) -> None:
        period = 1.0 / self.rate_hz
        next_t = time.monotonic() + period
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            self._sample()
            next_t += period
            now = time.monotonic()
            if next_t < now:  # a slow read: skip the missed slots rather than burst
                next_t = now + period
        self._thread_cpu_s = time.thread_time()

    def _sample(self) -> None:
        try:
            value = self._source.read()
            point = (time.monotonic(), value)
        except Exception as exc:  # a sampler must outlive any bad read: counted, reported, not raised
            with self._lock:
                self._read_errors += 1
                message = f"read failed: {exc}"
                if len(self._errors) < MAX_ERRORS and message not in self._errors:
                    self._errors.append(message)
            return
        with self._lock:
            self._points.append(point)

    def _summarize(self) -> dict[str, Any]:
        src = self._source
        out: dict[str, Any] = {
            "kind": self.kind,
            "ok": False,
            "source": getattr(src, "source", None),
            "method": None,
            "samples": len(self._points),
            "rate_hz_requested": self.rate_hz,
            "rate_hz": None,
            "duration_s": round(self._t_stop - self._t_start, 6),
            "avg_w": None,
            "min_w": None,
            "max_w": None,
            "energy_j": None,
            "units": dict(UNITS, raw=getattr(src, "units", None)),
            "read_errors": self._read_errors,
            "sampler_thread_cpu_s": round(self._thread_cpu_s, 4),
            "errors": list(self._errors),
            "warnings": [],
        }
        if self.kind == "none":
            out["warnings"].append("power.kind: none: nothing was measured")
            return out
        if src is None:
            return out
        stats = _counter_stats(self._points, out["errors"]) if src.counter else _sampled_stats(self._points)
        out["method"] = "counter" if src.counter else "sampled"
        if stats is not None:
            avg_w, min_w, max_w, span = stats
            out.update(
                ok=True,
                avg_w=round(avg_w, 6),
                min_w=round(min_w, 6),
                max_w=round(max_w, 6),
                energy_j=round(avg_w * out["duration_s"], 6),
                rate_hz=round((len(self._points) - 1) / span, 3) if span > 0 else None,
            )
        elif not out["errors"]:
            out["errors"].append(f"too few readings ({len(self._points)}) to give a power figure")
        if hasattr(src, "extra"):
            out.update(src.extra())
        if hasattr(src, "warnings"):
            out["warnings"].extend(src.warnings(out["avg_w"]))
        return out


def _sampled_stats(points: list[tuple[float, Any]]) -> tuple[float, float, float, float] | None:
    """(time-weighted average, min, max, sampled span) of (t, watts) points; trapezoidal integration."""
    if not points:
        return None
    points = sorted(points, key=lambda p: p[0])
    watts = [w for _, w in points]
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return watts[0], watts[0], watts[0], 0.0
    energy = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in _pairs(points))
    return energy / span, min(watts), max(watts), span


def _counter_stats(points: list[tuple[float, Any]], errors: list[str]) -> tuple[float, float, float, float] | None:
    """(average, min, max over intervals, span) of cumulative counter readings; wraps undone per channel."""
    if len(points) < 2:
        return None
    points = sorted(points, key=lambda p: p[0])
    joules: dict[str, float] = {}
    interval_w = []
    for (_, before), (_, after) in _pairs(points):
        watts, complete = 0.0, True
        for channel, (t1, e1, wrap) in after.items():
            if channel not in before:
                continue
            t0, e0, _ = before[channel]
            delta = counter_delta(e0, e1, wrap)
            if delta is None:
                if len(errors) < MAX_ERRORS:
                    errors.append(f"{channel}: counter went back from {e0:.6f} J to {e1:.6f} J (reset?)")
                complete = False
                continue
            joules[channel] = joules.get(channel, 0.0) + delta
            if t1 > t0:
                watts += delta / (t1 - t0)
            else:
                complete = False  # the device did not refresh this counter between the two reads
        if complete:
            interval_w.append(watts)
    first, last = points[0][1], points[-1][1]
    avg = 0.0
    for channel, energy in joules.items():
        dt = last[channel][0] - first[channel][0] if channel in first and channel in last else 0.0
        if dt > 0:
            avg += energy / dt
    if not joules:
        return None
    span = points[-1][0] - points[0][0]
    if not interval_w:
        interval_w = [avg]
    return avg, min(interval_w), max(interval_w), span


def _pairs(items: list[Any]) -> list[tuple[Any, Any]]:
    return [(items[i], items[i + 1]) for i in range(len(items) - 1)]


def measure_idle(
    kind: str,
    seconds: float,
    *,
    rate_hz: float | None = None,
    options: dict[str, Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Power with nothing running, for ``seconds`` (call before loading or warming up the model)."""
    with Sampler(kind, rate_hz, options) as sampler:
        sleep(seconds)
    out = sampler.result()
    out["phase"] = "idle"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 power_sampler.py rpi5_pmic 5`` prints one idle measurement as JSON (a check on a real device)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in KINDS:
        print(f"usage: power_sampler.py {{{','.join(KINDS)}}} [seconds] [options-json]", file=sys.stderr)
        return 2
    seconds = float(args[1]) if len(args) > 1 else 3.0
    options = json.loads(args[2]) if len(args) > 2 else None
    print(json.dumps(measure_idle(args[0], seconds, options=options), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
