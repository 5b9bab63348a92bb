"""Target profiles: every shipped profile validates; bad files are refused with file, field and valid values."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.errors import TargetConfigError
from pipeline.targets import TARGETS_DIR, available_targets, load_target, resolve_target_path

SHIPPED = ["rpi4", "rpi5", "android", "coral", "host"]


def _write(tmp_path: Path, data: object, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _valid() -> dict:
    return yaml.safe_load((TARGETS_DIR / "host.yaml").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_validate(name: str) -> None:
    profile = load_target(name)
    assert profile.name == name
    assert profile.quantize.ship in profile.quantize.precisions
    with pytest.raises(ValidationError, match="frozen"):
        profile.name = "x"  # type: ignore[misc]


def test_rpi_alias_points_at_the_default_pi() -> None:
    assert load_target("rpi").name == "rpi5"
    assert {"rpi", *SHIPPED} <= set(available_targets())


def test_coral_is_full_integer() -> None:
    coral = load_target("coral")
    assert coral.hardware.accelerator == "edgetpu"
    assert coral.quantize.ship == "int8" and coral.quantize.int8_io in ("int8", "uint8")


def test_unknown_target_suggests_close_match() -> None:
    with pytest.raises(TargetConfigError, match=r"unknown target 'rpii'.*Did you mean 'rpi'.*Valid targets: .*coral"):
        load_target("rpii")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TargetConfigError, match="no such target profile file"):
        load_target(str(tmp_path / "nope.yaml"))


def test_broken_yaml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\nhardware: [unclosed\n")
    with pytest.raises(TargetConfigError, match=rf"{path}: not valid YAML"):
        load_target(str(path))


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(TargetConfigError, match="expected a mapping"):
        load_target(str(_write(tmp_path, "- a\n- b\n")))


def test_unknown_key_lists_valid_fields(tmp_path: Path) -> None:
    data = _valid()
    data["pruning"]["chanel_multiple"] = 8
    with pytest.raises(TargetConfigError) as err:
        load_target(str(_write(tmp_path, data)))
    msg = str(err.value)
    assert "pruning -> chanel_multiple: unknown field" in msg
    assert "channel_multiple" in msg and "keep_layers" in msg
    assert str(tmp_path / "t.yaml") in msg


def test_wrong_type_is_not_coerced(tmp_path: Path) -> None:
    data = _valid()
    data["hardware"]["cores"] = "4"
    with pytest.raises(TargetConfigError, match=r"hardware -> cores: Input should be a valid integer \(got '4'\)"):
        load_target(str(_write(tmp_path, data)))


def test_enum_error_lists_valid_values(tmp_path: Path) -> None:
    data = _valid()
    data["quantize"]["int8_io"] = "int9"
    with pytest.raises(TargetConfigError, match=r"quantize -> int8_io: .*'int8', 'uint8' or 'float32'.*'int9'"):
        load_target(str(_write(tmp_path, data)))


@pytest.mark.parametrize(
    ("section", "key", "value", "pattern"),
    [
        ("pruning", "max_layer_ratio", 1.5, r"pruning -> max_layer_ratio: Input should be less than 1"),
        ("finetune", "alpha", -0.1, r"finetune -> alpha: Input should be greater than or equal to 0"),
        ("budgets", "max_accuracy_drop", 2, r"budgets -> max_accuracy_drop: Input should be less than or equal to 1"),
        ("profiling", "runs", 0, r"profiling -> runs: Input should be greater than or equal to 1"),
        (
            "quantize",
            "max_accuracy_drop",
            -0.01,
            r"quantize -> max_accuracy_drop: Input should be greater than or equal to 0",
        ),
        ("quantize", "max_accuracy_drop", "half", r"quantize -> max_accuracy_drop: Input should be a valid number"),
    ],
)
def test_out_of_range(tmp_path: Path, section: str, key: str, value: object, pattern: str) -> None:
    data = _valid()
    data[section][key] = value
    with pytest.raises(TargetConfigError, match=pattern):
        load_target(str(_write(tmp_path, data)))


def test_pruning_target_out_of_range(tmp_path: Path) -> None:
    data = _valid()
    data["pruning"]["target"] = {"metric": "macs", "keep": 0}
    with pytest.raises(TargetConfigError, match=r"pruning -> target -> keep: Input should be greater than 0"):
        load_target(str(_write(tmp_path, data)))


def test_coral_without_full_int8_is_impossible(tmp_path: Path) -> None:
    data = yaml.safe_load((TARGETS_DIR / "coral.yaml").read_text())
    data["quantize"]["ship"] = "fp32"
    with pytest.raises(TargetConfigError, match=r"coral.*quantize -> ship: the Edge TPU runs only full-integer"):
        load_target(str(_write(tmp_path, data, "coral.yaml")))
    data["quantize"]["ship"] = "int8"
    data["quantize"]["int8_io"] = "float32"
    with pytest.raises(TargetConfigError, match=r"quantize -> int8_io: the Edge TPU needs integer I/O"):
        load_target(str(_write(tmp_path, data, "coral.yaml")))


def test_ship_must_be_built(tmp_path: Path) -> None:
    data = _valid()
    data["quantize"]["precisions"] = ["fp32"]
    data["quantize"]["ship"] = "int8"
    with pytest.raises(TargetConfigError, match=r"quantize -> ship: 'int8' is not among precisions \['fp32'\]"):
        load_target(str(_write(tmp_path, data)))


def test_more_threads_than_cores(tmp_path: Path) -> None:
    data = _valid()
    data["profiling"]["threads"] = 64
    with pytest.raises(TargetConfigError, match=r"profiling -> threads: 64 threads on a 2-core device"):
        load_target(str(_write(tmp_path, data)))


def test_transport_union_checks_its_own_fields(tmp_path: Path) -> None:
    data = _valid()
    data["transport"] = {"kind": "ssh", "hots": "pi.local"}
    with pytest.raises(TargetConfigError, match=r"transport -> hots: unknown field; valid fields here: host, kind"):
        load_target(str(_write(tmp_path, data)))
    data["transport"] = {"kind": "telnet"}
    with pytest.raises(TargetConfigError, match=r"transport.*'local', 'ssh', 'adb'"):
        load_target(str(_write(tmp_path, data)))


def test_shell_metacharacters_in_host_are_refused(tmp_path: Path) -> None:
    data = _valid()
    data["transport"] = {"kind": "ssh", "host": "pi.local; rm -rf /"}
    with pytest.raises(TargetConfigError, match=r"transport -> host: String should match pattern"):
        load_target(str(_write(tmp_path, data)))


def test_yaml_tags_are_never_evaluated(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: !!python/object/apply:os.system ['touch /tmp/edgeship-pwned']\n")
    with pytest.raises(TargetConfigError, match="not valid YAML"):
        load_target(str(path))
    assert not Path("/tmp/edgeship-pwned").exists()


def test_resolve_by_path_and_name(tmp_path: Path) -> None:
    assert resolve_target_path("coral") == TARGETS_DIR / "coral.yaml"
    path = _write(tmp_path, _valid(), "mine.yaml")
    assert load_target(str(path)).name == "host"


def test_digest_is_stable_and_sensitive(tmp_path: Path) -> None:
    data = _valid()
    a = load_target(str(_write(tmp_path, data, "a.yaml"))).digest()
    data["budgets"]["max_size_kb"] = 1
    b = load_target(str(_write(tmp_path, data, "b.yaml"))).digest()
    assert a != b and a == load_target("host").digest()


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    section=st.sampled_from(
        ["hardware", "budgets", "pruning", "finetune", "quantize", "profiling", "transport", "power", "name", "extra"]
    ),
    key=st.text(max_size=10),
    value=_values,
)
def test_fuzz_loader_raises_only_its_own_error(tmp_path: Path, section: str, key: str, value: object) -> None:
    data = _valid()
    if isinstance(data.get(section), dict):
        data[section][key] = value
    else:
        data[section] = value
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_target(str(path))
    except TargetConfigError as exc:
        assert str(path) in str(exc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_fuzz_raw_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "raw.yaml"
    path.write_text(text)
    with contextlib.suppress(TargetConfigError):
        load_target(str(path))


def test_command_line_overrides_are_validated_like_the_file() -> None:
    t = load_target("coral", overrides=("pruning.target.keep=0.8", "pruning.enabled=false", "budgets.latency_ms=3"))
    assert t.pruning.target.keep == 0.8 and t.pruning.enabled is False and t.budgets.latency_ms == 3.0
    assert load_target("coral").pruning.target.keep == 0.5  # the file is untouched
    with pytest.raises(TargetConfigError, match=r"pruning -> target -> kep: unknown field; valid fields here: keep"):
        load_target("coral", overrides=("pruning.target.kep=0.8",))
    with pytest.raises(TargetConfigError, match=r"quantize -> ship: the Edge TPU runs only full-integer"):
        load_target("coral", overrides=("quantize.ship=fp32",))
    with pytest.raises(TargetConfigError, match=r"expected field.path=value"):
        load_target("coral", overrides=("pruning.target.keep",))
    with pytest.raises(TargetConfigError, match=r"is a value, not a section"):
        load_target("coral", overrides=("name.x=1",))
