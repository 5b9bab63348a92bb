"""Energy per inference from the device's power readings, or an estimate from the profile, labelled so.

The readings come from ``pipeline/remote/power_sampler.py`` run on the device (its ``measure_idle`` before the
model is loaded and its ``Sampler`` around the timed loop). Where no sensor exists (``power.kind: none``) or the
sensor gave nothing, the profile's ``idle_w``/``active_w`` stand in: every such figure carries
``estimated: true`` and every line ``format_energy`` writes for it says "estimated".

Energy per inference is average power times mean latency (W x ms = mJ); "above idle" subtracts the power the
device draws doing nothing, which is the part the model is responsible for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.targets import Power

UNITS = {"power": "W", "energy_per_inference": "mJ", "run_energy": "J", "latency": "ms"}
# power_sampler options a profile's power section may set (read by name, so fields added to targets.Power later
# are picked up without a change here)
SAMPLER_OPTION_FIELDS = ("gain", "offset_w", "name", "supply", "current_unit", "voltage_unit", "rails", "zones")


def sampler_options(profile_power: Any) -> dict[str, Any]:
    """The JSON options for ``power_sampler`` that the profile's power section sets (e.g. the Pi 5 calibration
    ``gain``/``offset_w``); what the host passes to the device runner beside ``power.kind``."""
    options: dict[str, Any] = {}
    for field in SAMPLER_OPTION_FIELDS:
        value = getattr(profile_power, field, None)
        if value is not None:
            options[field] = list(value) if isinstance(value, tuple) else value
    return options


def _measured(reading: Mapping[str, Any] | None) -> bool:
    return bool(reading) and bool(reading.get("ok")) and reading.get("avg_w") is not None


def _why_not_measured(active: Mapping[str, Any] | None, kind: str) -> str:
    if kind == "none":
        return "no sensor: power.kind none"
    if not active:
        return f"power.kind {kind}: the device returned no power reading"
    errors = active.get("errors") or []
    return f"power.kind {kind} unavailable: {errors[0]}" if errors else f"power.kind {kind} gave no reading"


def _method(active: Mapping[str, Any]) -> str:
    source = active.get("source")
    if active.get("method") == "counter" and not active.get("rate_hz_requested"):
        return f"measured ({source}, cumulative counter read at start and stop, {active.get('duration_s', 0):.3g} s)"
    rate = active.get("rate_hz")
    rate_text = f"{rate:.3g} Hz" if rate else "one reading"
    return f"measured ({source}, {active.get('samples')} samples at {rate_text})"


def energy_summary(
    idle: Mapping[str, Any] | None,
    active: Mapping[str, Any] | None,
    *,
    latency_ms: float,
    inferences: int,
    profile_power: Power,
    sampled: bool = True,
) -> dict[str, Any]:
    """Average active and idle power, power above idle and energy per inference (mJ), with how each was had.

    ``idle``/``active`` are ``power_sampler`` results (None when the runner had none); ``latency_ms`` is the
    mean latency of one inference and ``inferences`` the number timed while ``active`` was sampled.
    ``sampled=False``: the runner was not asked to read a sensor (profiled on this machine standing in for the
    target), which the method then says instead of blaming the device."""
    if latency_ms <= 0 or inferences < 0:
        raise ValueError(f"latency_ms must be > 0 and inferences >= 0 (got {latency_ms}, {inferences})")
    kind = profile_power.kind
    active_measured = kind != "none" and _measured(active)
    idle_measured = kind != "none" and _measured(idle)
    if active_measured:
        reason = ""
    elif not sampled and kind != "none":
        reason = f"no sensor read: profiled on this machine, which stands in for the {kind} device"
    else:
        reason = _why_not_measured(active, kind)

    active_w = float(active["avg_w"]) if active_measured else profile_power.active_w
    idle_w = float(idle["avg_w"]) if idle_measured else profile_power.idle_w
    active_estimated = not active_measured and active_w is not None
    idle_estimated = not idle_measured and idle_w is not None
    above_w = active_w - idle_w if active_w is not None and idle_w is not None else None

    if active_measured:
        method = _method(active)
        if idle_estimated:
            method += f"; idle estimated from the profile's idle_w {idle_w:g} W"
        elif idle_w is None:
            method += "; no idle figure"
    elif active_w is not None:
        idle_text = f" and idle_w {idle_w:g} W" if idle_w is not None else ""
        method = f"estimated from the profile's active_w {active_w:g} W{idle_text} ({reason})"
    else:
        method = f"none ({reason}); set power.active_w and power.idle_w in the profile for an estimate"

    warnings = [w for r in (idle, active) if r for w in r.get("warnings", [])]
    if above_w is not None and above_w < 0:
        warnings.append(
            f"active power {active_w:.3f} W is below idle {idle_w:.3f} W: the model's share is within the "
            "sensor's noise or the device was busier while idle"
        )
    run_energy_j = None
    if active_measured and active.get("energy_j") is not None:
        run_energy_j = float(active["energy_j"])
    elif active_w is not None:
        run_energy_j = active_w * latency_ms * inferences / 1000.0
    return {
        "available": active_w is not None,
        "estimated": active_estimated or idle_estimated,
        "active_estimated": active_estimated,
        "idle_estimated": idle_estimated,
        "method": method,
        "kind": kind,
        "source": active.get("source") if active_measured else None,
        "active_w": _round(active_w),
        "idle_w": _round(idle_w),
        "above_idle_w": _round(above_w),
        "energy_per_inference_mj": _round(active_w * latency_ms if active_w is not None else None),
        "energy_per_inference_above_idle_mj": _round(above_w * latency_ms if above_w is not None else None),
        "run_energy_j": _round(run_energy_j),
        "latency_ms": latency_ms,
        "inferences": inferences,
        "units": dict(UNITS),
        "errors": [e for r in (idle, active) if r for e in r.get("errors", [])],
        "warnings": warnings,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def format_energy(summary: Mapping[str, Any]) -> str:
    """A few report lines; when any figure is an estimate, every line says "estimated"."""
    tag = " (estimated)" if summary["estimated"] else ""
    lines = [f"power: {summary['method']}"]
    if not summary["available"]:
        return lines[0]
    figures = [f"active {summary['active_w']:.3f} W"]
    if summary["idle_w"] is not None:
        figures.append(f"idle {summary['idle_w']:.3f} W")
    if summary["above_idle_w"] is not None:
        figures.append(f"above idle {summary['above_idle_w']:.3f} W")
    lines.append("  " + ", ".join(figures) + tag)
    per = f"  energy per inference {summary['energy_per_inference_mj']:.4g} mJ"
    if summary["energy_per_inference_above_idle_mj"] is not None:
        per += f", {summary['energy_per_inference_above_idle_mj']:.4g} mJ above idle"
    lines.append(per + f" at {summary['latency_ms']:.4g} ms" + tag)
    if summary["run_energy_j"] is not None:
        lines.append(f"  {summary['inferences']} inferences: {summary['run_energy_j']:.4g} J{tag}")
    if summary["estimated"] and "estimated" not in lines[0]:
        lines[0] += " (estimated)"
    return "\n".join(lines)
