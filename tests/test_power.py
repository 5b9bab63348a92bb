"""Power sources on files in their real formats, the sampler on live fixture trees, and the energy summary."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pipeline.power import energy_summary, format_energy, sampler_options
from pipeline.remote import power_sampler as ps
from pipeline.targets import Power, load_target

pytest_plugins = ("bullseye_rootfs",)

DATA = Path(__file__).parent / "data" / "power"
SAMPLER_FILE = Path(ps.__file__)


def _fixture_runner(path: Path) -> Callable[[Sequence[str]], str]:
    return lambda argv: path.read_text()


def _write(path: Path, text: str) -> None:
    """Replace a sysfs-like file atomically, so a reader never sees it half written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(DATA / name, tmp_path / name.replace("/", "_")))


# ---------------------------------------------------------------- Raspberry Pi 5 PMIC


def test_pmic_pairs_current_and_voltage_rails_and_skips_voltage_only_ones():
    parsed = ps.parse_pmic_adc((DATA / "rpi5" / "pmic_read_adc_idle.txt").read_text())
    assert len(parsed["rails"]) == 12
    assert parsed["unpaired"] == ["BATT", "EXT5V"]  # EXT5V_V and BATT_V: a voltage only
    assert parsed["rails"]["VDD_CORE"] == pytest.approx(0.72451800 * 0.97880000)
    assert parsed["rails"]["HDMI"] == pytest.approx(5.07860000 * 0.02002440)
    assert parsed["total_w"] == pytest.approx(2.152801, abs=1e-6)


def test_pmic_source_applies_the_calibration_line():
    load = DATA / "rpi5" / "pmic_read_adc_load.txt"
    raw = ps.PmicSource(_fixture_runner(load))
    calibrated = ps.PmicSource(_fixture_runner(load), gain=1.1451, offset_w=0.5879)
    assert raw.read() == pytest.approx(5.525829, abs=1e-6)
    assert calibrated.read() == pytest.approx(6.915527, abs=1e-6)
    assert "uncalibrated" in raw.warnings(5.5)[0] and calibrated.warnings(6.9) == []
    assert calibrated.extra()["rail_avg_w"]["VDD_CORE"] == pytest.approx(0.88187950 * 4.31262990, abs=1e-6)


def test_pmic_on_a_board_without_the_adc_says_so():
    with pytest.raises(ps.PowerSourceError, match="only the Raspberry Pi 5"):
        ps.PmicSource(_fixture_runner(DATA / "rpi5" / "pi4_not_registered.txt"))


def test_pmic_through_a_real_subprocess_and_a_missing_vcgencmd():
    fixture = DATA / "rpi5" / "pmic_read_adc_idle.txt"
    cat = [sys.executable, "-c", f"import sys; sys.stdout.write(open({str(fixture)!r}).read())"]
    assert ps.run_command(cat) == fixture.read_text()
    assert ps.PmicSource(ps.run_command, command=cat).read() == pytest.approx(2.152801, abs=1e-6)
    with pytest.raises(ps.PowerSourceError, match=r"vcgencmd: command not found.*Raspberry Pi 5"):
        ps.open_source("rpi5_pmic", {"command": ["/nonexistent/vcgencmd", "pmic_read_adc"]})


# ---------------------------------------------------------------- INA2xx through hwmon


@pytest.mark.parametrize(
    ("chip", "hwmon", "power_w", "v_times_i_w"),
    [("ina219", "hwmon2", 4.332, 4.3316), ("ina226", "hwmon3", 6.150, 6.16448), ("ina260", "hwmon2", 4.760, 4.764384)],
)
def test_hwmon_ina_found_by_name_in_real_units(tmp_path, chip, hwmon, power_w, v_times_i_w):
    root = _copy(tmp_path, f"hwmon/{chip}")
    [(directory, name)] = ps.find_ina_hwmon(str(root))
    assert (Path(directory).name, name) == (hwmon, chip)
    assert ps.read_hwmon_power(directory) == (pytest.approx(power_w), "power1_input")  # uW -> W
    (Path(directory) / "power1_input").unlink()  # older chips/kernels: bus mV * mA
    assert ps.read_hwmon_power(directory) == (pytest.approx(v_times_i_w), "in1_input*curr1_input")


def test_hwmon_without_an_ina_gives_a_clear_error():
    with pytest.raises(ps.PowerSourceError) as err:
        ps.open_source("hwmon", {"root": str(DATA / "hwmon" / "no_ina")})
    message = str(err.value)
    assert "sys/class/hwmon/*/name matching ina219" in message
    assert "power.kind: hwmon needs an INA219/226/260 with the ina2xx driver" in message
    with pytest.raises(ps.PowerSourceError, match="matching ina219"):
        ps.open_source("hwmon", {"root": str(DATA / "hwmon" / "ina226"), "name": "ina219"})


# ---------------------------------------------------------------- Android battery


def test_battery_power_is_the_same_under_both_vendor_sign_conventions():
    results = {}
    for vendor in ("negative_discharging", "positive_discharging"):
        source = ps.open_source("android_battery", {"root": str(DATA / "android_battery" / vendor)})
        results[vendor] = (source.read(), source.extra()["current_sign"], source.warnings(1.8))
    assert results["negative_discharging"][0] == pytest.approx(0.452 * 3.987)  # uA * uV -> W
    assert results["positive_discharging"][0] == pytest.approx(0.452 * 3.987)
    assert results["negative_discharging"][1] == "negative while discharging"
    assert results["positive_discharging"][1] == "positive while discharging"
    assert results["negative_discharging"][2] == [] == results["positive_discharging"][2]


def test_battery_while_charging_is_flagged_and_a_missing_gauge_named():
    source = ps.open_source("android_battery", {"root": str(DATA / "android_battery" / "charging")})
    source.read()
    [warning] = source.warnings(5.1)
    assert "Charging" in warning and "not the phone's draw" in warning
    with pytest.raises(ps.PowerSourceError, match=r"power supplies here: ac, usb"):
        ps.open_source("android_battery", {"root": str(DATA / "android_battery" / "no_battery")})


def test_battery_in_milliamps_is_caught_as_implausible(tmp_path):
    root = _copy(tmp_path, "android_battery/negative_discharging")
    (root / "sys/class/power_supply/battery/current_now").write_text("-452\n")  # a gauge reporting mA
    result = ps.Sampler("android_battery", rate_hz=0, options={"root": str(root)}).start().stop()
    assert result["ok"] and result["avg_w"] == pytest.approx(0.000452 * 3.987, abs=1e-6)  # rounded to uW
    assert any("current_unit: mA" in w for w in result["warnings"])
    fixed = ps.Sampler("android_battery", 0, {"root": str(root), "current_unit": "mA"}).start().stop()
    assert fixed["avg_w"] == pytest.approx(0.452 * 3.987) and fixed["warnings"] == []


# ---------------------------------------------------------------- Pixel ODPM


def test_odpm_dumpsys_two_snapshots_give_rail_power():
    t0 = ps.parse_odpm_dumpsys((DATA / "odpm" / "dumpsys_t0.txt").read_text())
    t1 = ps.parse_odpm_dumpsys((DATA / "odpm" / "dumpsys_t1_delta.txt").read_text())  # the `delta` form
    assert len(t0) == len(t1) == 16
    assert t0["[S2M_VDD_CPUCL2]:CPU(BIG)"] == pytest.approx(30203502, abs=10)  # mWs -> uWs, %.2f of a float32
    watts = {rail: (t1[rail] - t0[rail]) / 1e6 / 2.0 for rail in t0}  # snapshots 2.000 s apart
    assert watts["[S2M_VDD_CPUCL2]:CPU(BIG)"] == pytest.approx(1.450, abs=1e-4)
    assert watts["[VSYS_PWR_DISPLAY]:Display"] == pytest.approx(0.400, abs=1e-4)
    assert sum(watts.values()) == pytest.approx(3.5, abs=1e-3)
    with pytest.raises(ps.PowerSourceError, match="reports no energy meters"):
        ps.parse_odpm_dumpsys((DATA / "odpm" / "dumpsys_no_meter.txt").read_text())


def test_odpm_iio_energy_value_two_snapshots():
    text = (DATA / "odpm" / "iio_t0" / "sys/bus/iio/devices/iio:device0/energy_value").read_text()
    t_ms, rails = ps.parse_odpm_energy_value(text)
    assert t_ms == 349894 and len(rails) == 8 and rails["S4M_VDD_CPUCL0"] == 46356942
    before = ps.OdpmIioSource(str(DATA / "odpm" / "iio_t0")).read()
    after = ps.OdpmIioSource(str(DATA / "odpm" / "iio_t1")).read()
    assert len(before) == 16  # both PMICs; the unrelated iio:device2 is left out
    watts = {ch: (after[ch][1] - before[ch][1]) / (after[ch][0] - before[ch][0]) for ch in before}
    assert sum(watts.values()) == pytest.approx(3.5, abs=1e-9)
    cpu = ps.OdpmIioSource(str(DATA / "odpm" / "iio_t0"), rails=["CPUCL"]).read()
    assert sorted(ch.split(":")[-1] for ch in cpu) == ["S2M_VDD_CPUCL2", "S3M_VDD_CPUCL1", "S4M_VDD_CPUCL0"]


def test_odpm_falls_back_to_dumpsys_and_names_both_when_neither_exists(tmp_path):
    dump = ps.open_source("odpm", {"root": str(tmp_path), "run": _fixture_runner(DATA / "odpm" / "dumpsys_t0.txt")})
    assert isinstance(dump, ps.OdpmDumpsysSource)
    assert isinstance(ps.open_source("odpm", {"root": str(DATA / "odpm" / "iio_t0")}), ps.OdpmIioSource)

    def no_dumpsys(argv: Sequence[str]) -> str:
        raise ps.PowerSourceError("dumpsys: command not found on this device")

    with pytest.raises(ps.PowerSourceError) as err:
        ps.open_source("odpm", {"root": str(tmp_path), "run": no_dumpsys})
    assert "iio:device*" in str(err.value) and "dumpsys: command not found" in str(err.value)


# ---------------------------------------------------------------- Intel RAPL


def test_rapl_sums_packages_only_and_undoes_the_wraparound():
    zones = ps.find_rapl_zones(str(DATA / "rapl" / "t0"))
    assert [(Path(z).name, name) for z, name in zones] == [("intel-rapl:0", "package-0")]  # not psys, not core
    before = ps.RaplSource(str(DATA / "rapl" / "t0")).read()["package-0"]
    after = ps.RaplSource(str(DATA / "rapl" / "t1")).read()["package-0"]
    assert after[1] < before[1]  # the counter wrapped between the snapshots
    assert ps.counter_delta(before[1], after[1], before[2]) == pytest.approx(30.0, abs=1e-9)  # 15 W for 2 s
    assert ps.counter_delta(5.0, 3.0, None) is None
    psys = ps.RaplSource(str(DATA / "rapl" / "t1"), zones=["psys"]).read()
    assert list(psys) == ["psys"]


def test_rapl_missing_counters_are_explained(tmp_path):
    with pytest.raises(ps.PowerSourceError, match="intel_rapl powercap driver"):
        ps.open_source("rapl", {"root": str(tmp_path)})


def _as_a_plain_user(argv: list[str]) -> list[str]:
    """argv run as `nobody` when this is root (setpriv, util-linux), else as this (non-root) user."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("as root, provoking the permission message needs setpriv (util-linux) to drop to nobody")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--", *argv]


def test_rapl_root_only_counters_are_explained_to_a_plain_user(tmp_path):
    """Linux 5.10+ makes energy_uj root-only: a real EACCES from the kernel, in a process that is not root (as
    root the test drops to nobody), gives the message; root itself reads the same file."""
    base = Path(tempfile.mkdtemp(prefix="edgeship-rapl-"))  # not under pytest's 0700 tmp: nobody must reach it
    try:
        base.chmod(0o755)
        root = Path(shutil.copytree(DATA / "rapl" / "t0", base / "t0"))
        shutil.copyfile(SAMPLER_FILE, base / "power_sampler.py")  # a lone stdlib-only file, as on a device
        (root / "sys/class/powercap/intel-rapl:0/energy_uj").chmod(0)
        code = (
            f"import json, os, sys; sys.path.insert(0, {str(base)!r}); import power_sampler as ps\n"
            f"try:\n    ps.open_source('rapl', {{'root': {str(root)!r}}}); said = None\n"
            "except ps.PowerSourceError as exc:\n    said = str(exc)\n"
            "print(json.dumps({'euid': os.geteuid(), 'said': said}))\n"
        )
        for python in (os.path.realpath(sys.executable), "/usr/bin/python3"):
            proc = subprocess.run(_as_a_plain_user([python, "-c", code]), capture_output=True, text=True, timeout=60)
            if proc.returncode == 0:
                break
        else:
            pytest.skip(f"no Python this user (or nobody) can run: {proc.stderr[-300:]}")
        out = json.loads(proc.stdout)
        assert out["euid"] != 0
        assert out["said"] is not None and "energy_uj is readable by root only" in out["said"], out
        assert "CVE-2020-8694" in out["said"] and "run the benchmark as root or make the file readable" in out["said"]
        if os.geteuid() == 0:  # the control: the same mode-000 file is no obstacle to root
            assert [name for _, name in ps.open_source("rapl", {"root": str(root)}).zones] == ["package-0"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- the sampler, on live trees


class _StepPower(threading.Thread):
    """Writes power1_input as a step function of real time and records each step (time, watts)."""

    def __init__(self, path: Path, levels: Sequence[float], step_s: float):
        super().__init__(daemon=True)
        self.path, self.levels, self.step_s = path, levels, step_s
        self.steps: list[tuple[float, float]] = []
        self.done = threading.Event()

    def set(self, watts: float) -> None:
        _write(self.path, f"{round(watts * 1e6)}\n")
        self.steps.append((time.monotonic(), watts))

    def run(self) -> None:
        i = 0
        while not self.done.wait(self.step_s):
            i += 1
            self.set(self.levels[i % len(self.levels)])

    def energy(self, t_a: float, t_b: float) -> float:
        """The integral of the injected power over [t_a, t_b]."""
        total = 0.0
        for (t0, w), (t1, _) in zip(self.steps, [*self.steps[1:], (t_b, 0.0)], strict=True):
            lo, hi = max(t0, t_a), min(t1, t_b)
            total += w * max(0.0, hi - lo)
        return total


def test_sampler_integrates_a_changing_hwmon_power_in_real_time(tmp_path):
    root = _copy(tmp_path, "hwmon/ina226")
    writer = _StepPower(root / "sys/class/hwmon/hwmon3/power1_input", [2.0, 6.0, 3.0, 5.0], step_s=0.05)
    writer.set(2.0)
    writer.start()
    t_a = time.monotonic()
    with ps.Sampler("hwmon", rate_hz=200, options={"root": str(root)}) as sampler:
        time.sleep(0.5)
    t_b = time.monotonic()
    writer.done.set()
    writer.join()
    result = sampler.result()
    injected = writer.energy(t_a, t_b)
    assert result["ok"] and result["method"] == "sampled" and result["errors"] == []
    assert result["energy_j"] == pytest.approx(injected, rel=0.12)
    assert result["avg_w"] == pytest.approx(injected / (t_b - t_a), rel=0.12)
    assert (result["min_w"], result["max_w"]) == (2.0, 6.0)
    assert result["samples"] >= 30 and 30 <= result["rate_hz"] <= 210
    assert result["duration_s"] == pytest.approx(t_b - t_a, abs=0.05)
    assert result["units"]["energy"] == "J" and "uW" in result["units"]["raw"]


def test_sampler_follows_a_rapl_counter_through_several_wraps(tmp_path):
    root = _copy(tmp_path, "rapl/t0")
    zone = root / "sys/class/powercap/intel-rapl:0"
    (zone / "max_energy_range_uj").write_text("1000000\n")  # wraps every 1 J: 5 W wraps it every 0.2 s
    watts, t0, stop = 5.0, time.monotonic(), threading.Event()

    def counter() -> None:
        while not stop.wait(0.002):
            _write(zone / "energy_uj", f"{round((time.monotonic() - t0) * watts * 1e6) % 1000000}\n")

    _write(zone / "energy_uj", "0\n")
    thread = threading.Thread(target=counter, daemon=True)
    thread.start()
    with ps.Sampler("rapl", rate_hz=50, options={"root": str(root)}) as sampler:
        time.sleep(0.5)
    stop.set()
    thread.join()
    result = sampler.result()
    assert result["ok"] and result["method"] == "counter" and result["errors"] == []
    assert result["avg_w"] == pytest.approx(watts, rel=0.1)
    assert result["energy_j"] == pytest.approx(watts * result["duration_s"], rel=0.1)  # 2.5 J through 1 J wraps
    assert result["min_w"] < result["avg_w"] < result["max_w"]


def test_sampler_reads_odpm_counters_at_start_and_stop(tmp_path):
    """dumpsys with no timestamp (the call is timed) and iio energy_value with the kernel's t= timestamp."""
    t0 = time.monotonic()
    watts = 3.5
    template = (DATA / "odpm" / "dumpsys_t0.txt").read_text()

    def dumpsys(argv: Sequence[str]) -> str:
        joules = (time.monotonic() - t0) * watts
        return template.replace("46356.94 mWs", f"{46356.94 + joules * 1000:.2f} mWs")

    with ps.Sampler("odpm", options={"root": str(tmp_path), "run": dumpsys}) as sampler:
        time.sleep(0.3)
    result = sampler.result()
    assert result["ok"] and result["samples"] == 2 and result["rate_hz_requested"] == 0
    assert result["avg_w"] == pytest.approx(watts, rel=0.1)
    assert "IPowerStats/default" in result["source"]
    summary = energy_summary(None, result, latency_ms=10.0, inferences=30, profile_power=Power(kind="odpm"))
    assert "cumulative counter read at start and stop" in summary["method"] and not summary["estimated"]
    assert summary["energy_per_inference_mj"] == pytest.approx(watts * 10.0, rel=0.1)

    root = _copy(tmp_path, "odpm/iio_t0")
    energy_value = root / "sys/bus/iio/devices/iio:device1/energy_value"
    original = energy_value.read_text()
    stop = threading.Event()

    def kernel() -> None:  # the display rail draws `watts`, the kernel stamps t= in ms since "boot" (t0)
        while not stop.wait(0.005):
            ms = int((time.monotonic() - t0) * 1000)
            _write(
                energy_value,
                original.replace("t=349894", f"t={ms}").replace(
                    "], 81221665", f"], {81221665 + ms * watts * 1000:.0f}"
                ),
            )

    thread = threading.Thread(target=kernel, daemon=True)
    thread.start()
    time.sleep(0.02)
    with ps.Sampler("odpm", rate_hz=20, options={"root": str(root)}) as sampler:
        time.sleep(0.3)
    stop.set()
    thread.join()
    result = sampler.result()
    assert result["ok"] and "energy_value" in result["source"] and result["samples"] >= 4
    assert result["avg_w"] == pytest.approx(watts, rel=0.1)


def test_sampler_never_raises_for_a_missing_source_unless_strict():
    no_ina = {"root": str(DATA / "hwmon" / "no_ina")}
    result = ps.Sampler("hwmon", options=no_ina).start().stop()
    assert result["ok"] is False and result["avg_w"] is None and result["samples"] == 0
    assert "ina2xx driver" in result["errors"][0]
    with pytest.raises(ps.PowerSourceError, match="ina2xx driver"):
        ps.Sampler("hwmon", options=no_ina, strict=True).start()
    assert ps.Sampler("hwmon", options=no_ina).stop()["duration_s"] < 1.0  # stopped without a start
    none = ps.Sampler("none").start().stop()
    assert none["ok"] is False and none["errors"] == [] and "nothing was measured" in none["warnings"][0]
    with pytest.raises(ValueError, match="unknown power kind 'ina'"):
        ps.Sampler("ina")


def test_sampler_records_a_failed_read_and_keeps_the_good_ones(tmp_path):
    root = _copy(tmp_path, "hwmon/ina219")
    sampler = ps.Sampler("hwmon", rate_hz=0, options={"root": str(root)}).start()
    (root / "sys/class/hwmon/hwmon2/power1_input").write_text("garbage\n")
    result = sampler.stop()
    assert result["ok"] and result["samples"] == 1 and result["avg_w"] == pytest.approx(4.332)
    assert result["read_errors"] == 1 and result["errors"][0].startswith("read failed:")


def test_measure_idle_samples_for_the_given_time(tmp_path):
    result = ps.measure_idle("hwmon", 0.25, options={"root": str(DATA / "hwmon" / "ina226")})
    assert result["phase"] == "idle" and result["ok"]
    assert result["avg_w"] == pytest.approx(6.15) and result["energy_j"] == pytest.approx(6.15 * result["duration_s"])
    assert 0.25 <= result["duration_s"] < 1.0 and result["samples"] >= 5
    slept = []
    fake = ps.measure_idle(
        "hwmon", 7.0, rate_hz=0, options={"root": str(DATA / "hwmon" / "ina226")}, sleep=slept.append
    )
    assert slept == [7.0] and fake["samples"] == 2


def test_power_sampler_runs_standalone_stdlib_only_on_old_pythons():
    source = SAMPLER_FILE.read_text()
    tree = ast.parse(source, feature_version=(3, 7))  # raises on syntax newer than 3.7
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported - set(sys.stdlib_module_names)
    spec = importlib.util.spec_from_file_location("power_sampler_copied_to_a_device", SAMPLER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # as the device runner imports it: a lone file, no package
    assert module.measure_idle("hwmon", 0, rate_hz=0, options={"root": str(DATA / "hwmon" / "ina260")})["ok"]


def test_power_sampler_runs_on_debian_bullseye_python39(bullseye):
    """The sampler as a script on a real CPython 3.9 (Debian bullseye's, tests/bullseye_rootfs.py), reading the
    recorded INA219 tree copied into that system."""
    where = "/tmp/edgeship-sampler"
    shutil.rmtree(bullseye.host_path(where), ignore_errors=True)
    shutil.copytree(DATA / "hwmon" / "ina219", bullseye.host_path(where) / "ina219")
    bullseye.push(SAMPLER_FILE, f"{where}/power_sampler.py")
    try:
        done = bullseye.run([bullseye.python, f"{where}/power_sampler.py", "hwmon", "0.1",
                             json.dumps({"root": f"{where}/ina219"})], timeout_s=60)  # fmt: skip
    finally:
        shutil.rmtree(bullseye.host_path(where), ignore_errors=True)
    assert done.rc == 0, done.stderr
    reading = json.loads(done.stdout)
    assert reading["ok"] and reading["avg_w"] == pytest.approx(4.332) and reading["samples"] >= 2, reading
    probe = bullseye.run([bullseye.python, "-c", "import platform; print(platform.python_version())"], timeout_s=60)
    assert probe.stdout.startswith("3.9."), probe


# ---------------------------------------------------------------- energy summary


def _reading(avg_w: float, *, samples: int = 100, rate_hz: float = 49.8, energy_j: float | None = None) -> dict:
    return {
        "ok": True,
        "avg_w": avg_w,
        "samples": samples,
        "rate_hz": rate_hz,
        "source": "/sys/class/hwmon/hwmon3 (ina226, power1_input)",
        "energy_j": energy_j,
        "errors": [],
        "warnings": [],
    }


def test_measured_energy_per_inference_above_idle():
    summary = energy_summary(
        _reading(2.7, samples=250),
        _reading(6.15, energy_j=12.3),
        latency_ms=2.0,
        inferences=1000,
        profile_power=Power(kind="hwmon", idle_w=2.0, active_w=5.0),
    )
    assert summary["estimated"] is False and summary["available"] is True
    assert summary["method"] == "measured (/sys/class/hwmon/hwmon3 (ina226, power1_input), 100 samples at 49.8 Hz)"
    assert (summary["active_w"], summary["idle_w"], summary["above_idle_w"]) == (6.15, 2.7, pytest.approx(3.45))
    assert summary["energy_per_inference_mj"] == pytest.approx(12.3)  # 6.15 W * 2 ms
    assert summary["energy_per_inference_above_idle_mj"] == pytest.approx(6.9)
    assert summary["run_energy_j"] == 12.3
    text = format_energy(summary)
    assert "estimated" not in text and "12.3 mJ, 6.9 mJ above idle at 2 ms" in text


def test_estimate_from_the_profile_is_labelled_on_every_line():
    rpi4 = load_target("rpi4").power  # kind none, idle_w 2.7, active_w 6.4
    summary = energy_summary(None, None, latency_ms=2.0, inferences=500, profile_power=rpi4)
    assert summary["estimated"] is True and summary["active_estimated"] and summary["idle_estimated"]
    assert summary["method"].startswith("estimated from the profile's active_w 6.4 W and idle_w 2.7 W")
    assert "no sensor: power.kind none" in summary["method"]
    assert summary["energy_per_inference_mj"] == pytest.approx(12.8)
    assert summary["energy_per_inference_above_idle_mj"] == pytest.approx(7.4)
    assert summary["run_energy_j"] == pytest.approx(6.4)  # 6.4 W * 2 ms * 500
    lines = format_energy(summary).splitlines()
    assert len(lines) == 4 and all("estimated" in line for line in lines)


def test_missing_sensor_falls_back_to_an_estimate_that_names_the_error():
    failed = ps.Sampler("rpi5_pmic", options={"command": ["/nonexistent/vcgencmd", "pmic_read_adc"]}).start().stop()
    summary = energy_summary(
        failed, failed, latency_ms=4.0, inferences=10, profile_power=Power(kind="rpi5_pmic", idle_w=2.7, active_w=7.0)
    )
    assert summary["estimated"] and summary["active_w"] == 7.0 and summary["energy_per_inference_mj"] == 28.0
    assert "power.kind rpi5_pmic unavailable: /nonexistent/vcgencmd: command not found" in summary["method"]
    assert summary["errors"] and all("estimated" in line for line in format_energy(summary).splitlines())


def test_measured_active_with_estimated_idle_is_still_labelled_estimated():
    summary = energy_summary(
        None, _reading(6.0), latency_ms=1.0, inferences=1, profile_power=Power(kind="hwmon", idle_w=2.5)
    )
    assert summary["active_estimated"] is False and summary["idle_estimated"] is True and summary["estimated"]
    assert "idle estimated from the profile's idle_w 2.5 W" in summary["method"]
    assert summary["above_idle_w"] == 3.5
    assert all("estimated" in line for line in format_energy(summary).splitlines())


def test_no_sensor_and_no_profile_figures_gives_no_numbers():
    summary = energy_summary(None, None, latency_ms=1.0, inferences=5, profile_power=Power())
    assert summary["available"] is False and summary["estimated"] is False
    assert summary["energy_per_inference_mj"] is None and summary["run_energy_j"] is None
    assert format_energy(summary) == (
        "power: none (no sensor: power.kind none); set power.active_w and power.idle_w in the profile for an estimate"
    )


def test_active_below_idle_is_warned_and_bad_inputs_refused():
    summary = energy_summary(
        _reading(3.0), _reading(2.9), latency_ms=1.0, inferences=1, profile_power=Power(kind="hwmon")
    )
    assert summary["above_idle_w"] == pytest.approx(-0.1) and "below idle" in summary["warnings"][0]
    with pytest.raises(ValueError, match="latency_ms must be > 0"):
        energy_summary(None, None, latency_ms=0, inferences=1, profile_power=Power())


def test_sampler_options_come_from_the_profile_power_section(tmp_path):
    """targets/rpi5.yaml with a calibration set the way a user does (`--set power.gain=...`), through the
    benchmark settings for the device, to the real runner process and its sampler. No Pi 5 here: `vcgencmd` is
    a script printing the recorded `pmic_read_adc` output under load (tests/data/power/rpi5)."""
    from devices_fixtures import tiny_tflite

    from pipeline.bench import bench_settings, profile_local

    fast = ("power.idle_s=0.2", "profiling.warmup=1", "profiling.runs=20", "profiling.min_seconds=0.3")
    plain = load_target("rpi5", overrides=fast)
    assert sampler_options(plain.power) == {}  # the committed profile has no calibration
    t = load_target("rpi5", overrides=(*fast, "power.gain=1.1451", "power.offset_w=0.5879"))
    assert sampler_options(t.power) == {"gain": 1.1451, "offset_w": 0.5879}
    load = DATA / "rpi5" / "pmic_read_adc_load.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vcgencmd").write_text(f'#!/bin/sh\n[ "$1" = pmic_read_adc ] || exit 2\nexec cat "{load}"\n')
    (bin_dir / "vcgencmd").chmod(0o755)
    model = tiny_tflite(tmp_path / "m.tflite")
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{old_path}"
    try:
        calibrated = profile_local(model, bench_settings(t, on_host=False))["power"]
        uncalibrated = profile_local(model, bench_settings(plain, on_host=False))["power"]
    finally:
        os.environ["PATH"] = old_path
    assert calibrated["kind"] == "rpi5_pmic" and calibrated["errors"] == []
    for phase in ("idle", "active"):
        reading = calibrated[phase]
        assert reading["ok"] and reading["samples"] >= 2, reading
        assert reading["calibration"] == {"gain": 1.1451, "offset_w": 0.5879}
        assert reading["avg_w"] == pytest.approx(1.1451 * 5.525829 + 0.5879, abs=1e-5)  # gain x PMIC sum + offset
        assert not any("uncalibrated" in w for w in reading["warnings"])
        other = uncalibrated[phase]
        assert other["calibration"] == {"gain": 1.0, "offset_w": 0.0}
        assert other["avg_w"] == pytest.approx(5.525829, abs=1e-5) and "uncalibrated" in other["warnings"][0]
