"""Power and energy of a benchmarked model: device readings (``pipeline/remote/power_sampler.py``) turned into
energy per inference, or an estimate from the profile labelled ``estimated``."""

from pipeline.power.energy import energy_summary, format_energy, sampler_options

__all__ = ["energy_summary", "format_energy", "sampler_options"]
