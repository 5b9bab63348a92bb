"""Fault suite, target profiles: broken, mistyped, impossible and hostile profiles are refused with
TargetConfigError (file, field path, valid values) and nothing else; hypothesis fuzzes the loader.

Rows of docs/FAULTS.md ("Bad profiles"). Real files, the real loader, the real CLI; no mocks.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import TargetConfigError
from pipeline.targets import TARGETS_DIR, TargetProfile, available_targets, load_target

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.stem for p in TARGETS_DIR.glob("*.yaml") if p.name != "aliases.yaml")


def _shipped(name: str = "host") -> dict[str, Any]:
    return yaml.safe_load((TARGETS_DIR / f"{name}.yaml").read_text())


def _write(tmp_path: Path, content: object, name: str = "profile.yaml") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def _refused(path: Path, pattern: str) -> str:
    """Load `path`, expect TargetConfigError matching `pattern` that names the file; return the message."""
    with pytest.raises(TargetConfigError, match=pattern) as info:
        load_target(str(path))
    msg = str(info.value)
    assert str(path) in msg, msg
    return msg


# ------------------------------------------------------------------ broken YAML


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("name: x\nhardware: [unclosed\n", "not valid YAML"),
        ("name: x\n  hardware: 1\n bad: indentation\n", "not valid YAML"),
        ("name: x\nhardware:\n\t- tab\n", "not valid YAML"),
        ('name: "unterminated\n', "not valid YAML"),
        ("name: x\n--- \nsecond: document\n", "not valid YAML"),  # two documents in one profile
        (b"name: \xff\xfe broken utf-8\n", "cannot read the profile"),
        ("name: x\x00y\n", "not valid YAML"),
        ("", r"expected a mapping of fields at the top level, got NoneType"),
        ("just a string\n", r"expected a mapping of fields at the top level, got str"),
        ("- a\n- b\n", r"expected a mapping of fields at the top level, got list"),
    ],
    ids=["unclosed", "indent", "tab", "quote", "two-docs", "not-utf8", "nul", "empty", "scalar", "list"],
)
def test_broken_yaml_is_refused_naming_the_file(tmp_path: Path, text: str | bytes, pattern: str) -> None:
    _refused(_write(tmp_path, text), pattern)


def test_missing_or_unreadable_profile_file(tmp_path: Path) -> None:
    with pytest.raises(TargetConfigError, match=r"nope\.yaml: no such target profile file"):
        load_target(str(tmp_path / "nope.yaml"))
    (tmp_path / "dir.yaml").mkdir()  # a folder with a profile's name
    with pytest.raises(TargetConfigError, match=r"dir\.yaml: no such target profile file"):
        load_target(str(tmp_path / "dir.yaml"))


# ------------------------------------------------------------------ unknown target names


@pytest.mark.parametrize(
    ("typo", "meant"), [("rpi55", "rpi5"), ("corall", "coral"), ("andriod", "android"), ("hots", "host")]
)
def test_unknown_target_suggests_the_close_match(typo: str, meant: str) -> None:
    with pytest.raises(TargetConfigError) as info:
        load_target(typo)
    msg = str(info.value)
    assert f"unknown target {typo!r}. Did you mean {meant!r}?" in msg
    for name in ("rpi4", "rpi5", "android", "coral", "host"):
        assert name in msg.split("Valid targets: ")[1]


def test_unknown_target_from_the_cli_exits_2_with_the_suggestion() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "targets", "rpi55"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2
    assert "edgeship: error: unknown target 'rpi55'. Did you mean 'rpi5'?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["a" * 5000, "", "..", "aliases", "x" * 300 + ".yaml", "../" * 50 + "etc/passwd"])
def test_odd_target_names_are_refused_cleanly(name: str) -> None:
    """Names the OS refuses (5000 characters: ENAMETOOLONG) and names of non-profiles are TargetConfigError."""
    with pytest.raises(TargetConfigError) as info:
        load_target(name)
    assert len(str(info.value)) < 1000  # a long name is shortened in the message


# ------------------------------------------------------------------ unknown keys, wrong types


@pytest.mark.parametrize(
    ("path", "field", "valid"),
    [
        (("hardwere",), "hardwere", "hardware"),
        (("pruning", "chanel_multiple"), "pruning -> chanel_multiple", "channel_multiple"),
        (("pruning", "target", "kep"), "pruning -> target -> kep", "keep"),
        (("quantize", "int8io"), "quantize -> int8io", "int8_io"),
        (("profiling", "thread"), "profiling -> thread", "threads"),
    ],
)
def test_unknown_keys_name_the_path_and_the_valid_fields(
    tmp_path: Path, path: tuple[str, ...], field: str, valid: str
) -> None:
    data = _shipped()
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = 1
    msg = _refused(_write(tmp_path, data), rf"{field}: unknown field; valid fields here: ")
    assert valid in msg.split(f"{field}: unknown field; valid fields here: ")[1]


@pytest.mark.parametrize(
    ("section", "key", "value", "pattern"),
    [
        ("hardware", "cores", "4", r"hardware -> cores: Input should be a valid integer \(got '4'\)"),
        ("hardware", "cores", 2.5, r"hardware -> cores: Input should be a valid integer"),
        ("hardware", "memory_mb", True, r"hardware -> memory_mb: Input should be a valid integer"),
        ("budgets", "latency_ms", "5ms", r"budgets -> latency_ms: Input should be a valid number"),
        ("pruning", "enabled", "true", r"pruning -> enabled: Input should be a valid boolean"),
        ("pruning", "keep_layers", "stem.0", r"pruning -> keep_layers: Input should be a valid (array|tuple)"),
        ("quantize", "precisions", "fp32", r"quantize -> precisions: Input should be a valid (array|tuple)"),
        ("quantize", "precisions", ["fp32", "fp64"], r"quantize -> precisions -> 1: Input should be 'fp32'"),
        ("profiling", "threads", None, r"profiling -> threads: Input should be a valid integer"),
    ],
)
def test_wrong_types_are_not_coerced(tmp_path: Path, section: str, key: str, value: object, pattern: str) -> None:
    data = _shipped()
    data[section][key] = value
    _refused(_write(tmp_path, data), pattern)


@pytest.mark.parametrize(
    ("section", "value", "pattern"),
    [
        ("hardware", [1, 2], r"hardware: Input should be (a valid dictionary|an object)"),
        ("transport", "ssh", r"transport: Input should be (a valid dictionary|an object)"),
        ("transport", {"kind": "telnet"}, r"transport: .*'local', 'ssh', 'adb'"),
        ("name", "Has Spaces", r"name: String should match pattern"),
    ],
)
def test_wrong_shapes_of_sections(tmp_path: Path, section: str, value: object, pattern: str) -> None:
    data = _shipped()
    data[section] = value
    _refused(_write(tmp_path, data), pattern)


# ------------------------------------------------------------------ out-of-range values


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [
        (("pruning", "target", "keep"), 0, r"pruning -> target -> keep: Input should be greater than 0"),
        (("pruning", "target", "keep"), -0.2, r"pruning -> target -> keep: Input should be greater than 0"),
        (("pruning", "target", "keep"), 1.5, r"pruning -> target -> keep: Input should be less than or equal to 1"),
        (("pruning", "target", "keep"), float("nan"), r"pruning -> target -> keep: Input should be .*\(got nan\)"),
        (("pruning", "max_layer_ratio"), 1.0, r"pruning -> max_layer_ratio: Input should be less than 1"),
        (("pruning", "max_layer_ratio"), 0, r"pruning -> max_layer_ratio: Input should be greater than 0"),
        (("pruning", "channel_multiple"), 0, r"pruning -> channel_multiple: Input should be greater than or equal"),
        (("finetune", "alpha"), 1.5, r"finetune -> alpha: Input should be less than or equal to 1"),
        (("finetune", "lr"), float("inf"), r"finetune -> lr: Input should be less than 1"),
        (("budgets", "max_accuracy_drop"), -0.1, r"budgets -> max_accuracy_drop: Input should be greater than or"),
        (("quantize", "calibration_images"), 5, r"quantize -> calibration_images: Input should be greater than or"),
        (("profiling", "runs"), 0, r"profiling -> runs: Input should be greater than or equal to 1"),
        (("hardware", "cores"), 10**40, r"hardware -> cores: the number is out of range"),
    ],
)
def test_out_of_range_values(tmp_path: Path, path: tuple[str, ...], value: object, pattern: str) -> None:
    data = _shipped()
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    _refused(_write(tmp_path, data), pattern)


# ------------------------------------------------------------------ impossible combinations


def _coral() -> dict[str, Any]:
    return _shipped("coral")


def _combo(name: str) -> tuple[dict[str, Any], str]:
    d = _coral() if name.startswith("coral") else _shipped()
    match name:
        case "coral-ship-fp32":
            d["quantize"]["ship"] = "fp32"
            return d, r"quantize -> ship: the Edge TPU runs only full-integer models; set ship: int8 \(got 'fp32'\)"
        case "coral-ship-fp16":
            d["quantize"].update(precisions=["fp16", "int8"], ship="fp16")
            return d, r"quantize -> ship: the Edge TPU runs only full-integer models; set ship: int8 \(got 'fp16'\)"
        case "coral-float-io":
            d["quantize"]["int8_io"] = "float32"
            return d, r"quantize -> int8_io: the Edge TPU needs integer I/O; use int8 or uint8"
        case "ship-not-built":
            d["quantize"].update(precisions=["fp32", "fp16"], ship="int8")
            return d, r"quantize -> ship: 'int8' is not among precisions \['fp32', 'fp16'\]"
        case "precision-twice":
            d["quantize"].update(precisions=["fp32", "int8", "fp32"], ship="int8")
            return d, r"quantize -> precisions: listed twice"
        case "threads-over-cores":
            d["profiling"]["threads"] = 8
            return d, r"profiling -> threads: 8 threads on a 2-core device; use at most 2"
        case "latency-without-budget":
            d["pruning"]["target"] = {"metric": "latency"}
            d["budgets"].pop("latency_ms")
            return d, r"pruning -> target -> metric: latency needs budgets.latency_ms"
        case "macs-without-keep":
            d["pruning"]["target"] = {"metric": "macs"}
            return d, r"pruning -> target -> keep: metric macs needs keep"
        case "latency-with-keep":
            d["pruning"]["target"] = {"metric": "latency", "keep": 0.5}
            return d, r"pruning -> target -> keep: metric latency takes its target from budgets.latency_ms"
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "coral-ship-fp32",
        "coral-ship-fp16",
        "coral-float-io",
        "ship-not-built",
        "precision-twice",
        "threads-over-cores",
        "latency-without-budget",
        "macs-without-keep",
        "latency-with-keep",
    ],
)
def test_impossible_combinations(tmp_path: Path, name: str) -> None:
    data, pattern = _combo(name)
    _refused(_write(tmp_path, data), pattern)


def test_coral_needs_full_int8_from_the_cli(tmp_path: Path) -> None:
    data = _coral()
    data["quantize"]["ship"] = "fp32"
    path = _write(tmp_path, data, "coral.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "targets", str(path)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2
    assert f"edgeship: error: {path}: quantize -> ship: the Edge TPU runs only full-integer models" in proc.stderr


# ------------------------------------------------------------------ hostile YAML structure


def _billion_laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"name: *l{levels - 1}", ""])


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (_billion_laughs(), r"more than 10000 values once YAML aliases are expanded"),
        ("name: &a [*a]\n", r"name -> 0 -> .*nested more than 16 levels deep \(an alias that contains itself\?\)"),
        ("name: &a {x: *a}\n", r"nested more than 16 levels deep"),
        ("name: " + "[" * 3000 + "]" * 3000 + "\n", r"not valid YAML: nested too deeply"),
        ("name: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", r"not valid YAML: nested too deeply"),
        ("name: host\nhardware: {cores: " + "9" * 5000 + "}\n", r"not valid YAML: ValueError: Exceeds the limit"),
        ("name: host\n2001-01-01: x\n", r"key datetime.date\(2001, 1, 1\) has YAML type date"),
        ("name: host\n? !!binary aGVsbG8=\n: 1\n", r"key b'hello' has YAML type bytes"),
        ("name: host\nx: !!timestamp\n", r"not valid YAML: AttributeError"),  # found by hypothesis
        ("name: host\nx: !!timestamp 2001-13-45\n", r"not valid YAML: ValueError: month must be in 1\.\.12"),
        ("name: !!binary aGVsbG8=\n", r"name: value b'hello' has YAML type bytes"),
        ("name: host\nhardware: !!set {a, b}\n", r"hardware: value \{.*\} has YAML type set"),
        ("name: 2024-05-01\n", r"name: value datetime.date\(2024, 5, 1\) has YAML type date"),
    ],
    ids=[
        "billion-laughs",
        "self-alias-list",
        "self-alias-map",
        "deep-list",
        "deep-map",
        "5000-digit-int",
        "date-key",
        "binary-key",
        "empty-timestamp",
        "bad-timestamp",
        "binary-value",
        "set-value",
        "date-value",
    ],
)
def test_hostile_yaml_structures_are_refused_quickly(tmp_path: Path, text: str, pattern: str) -> None:
    """Before the fix: ValueError, RecursionError, TypeError, or a hang (billion laughs) instead of this error."""
    path = _write(tmp_path, text)
    start = time.perf_counter()
    _refused(path, pattern)
    assert time.perf_counter() - start < 5


def test_oversized_profile_is_refused_without_parsing(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: host\n" + "# padding\n" * 200_000)
    _refused(path, r"2,000,011 bytes is not a target profile")


def test_yaml_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    """The limits do not refuse ordinary YAML: an anchor, an alias and a merge key in a real profile."""
    text = (
        "name: host\n"
        "description: &cpu x86_64 host CPU\n"
        "hardware: {arch: x86_64, cpu: *cpu, cores: 2, memory_mb: 4096}\n"
        "finetune: {<<: {epochs: 3, lr: 0.01}, lr: 0.002}\n"
    )
    profile = load_target(str(_write(tmp_path, text)))
    assert profile.hardware.cpu == "x86_64 host CPU" == profile.description
    assert (profile.finetune.epochs, profile.finetune.lr) == (3, 0.002)


# ------------------------------------------------------------------ hypothesis: the loader raises only its own error


def _load_only_config_errors(path: Path) -> TargetProfile | None:
    try:
        profile = load_target(str(path))
    except TargetConfigError as exc:
        assert str(exc), "an error without a message"
        return None
    profile.digest()  # a profile that loads is JSON-serialisable and hashable
    return profile


_keys = st.sampled_from(
    ["name", "hardware", "cores", "keep", "target", "ship", "kind", "host", "<<", "precisions", "threads", "x"]
) | st.text(max_size=8)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["fp32", "int8", "uint8", "local", "ssh", "adb", "edgetpu", "macs", "latency", "l2", "4"]),
)
_values = st.recursive(
    _scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_keys, kids, max_size=4),
    max_leaves=12,
)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def _mutated_profiles(draw: st.DrawFn) -> dict[str, Any]:
    """A shipped profile with 1-4 random edits: replace, delete, insert, rename a key, or retype a value."""
    data = copy.deepcopy(_shipped(draw(st.sampled_from(SHIPPED))))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(data)[1:]
        if not paths:
            break
        where = draw(st.sampled_from(paths))
        parent: Any = data
        for part in where[:-1]:
            parent = parent[part]
        last = where[-1]
        op = draw(st.sampled_from(["replace", "delete", "insert", "rename", "stringify"]))
        if op == "replace":
            parent[last] = draw(_values)
        elif op == "delete":
            del parent[last]
        elif op == "insert" and isinstance(parent, dict):
            parent[draw(_keys)] = draw(_values)
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(_keys)] = parent.pop(last)
        elif op == "stringify":
            parent[last] = str(parent[last])
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_mutated_profiles())
def test_fuzz_mutated_profiles_raise_only_target_config_error(tmp_path: Path, data: dict[str, Any]) -> None:
    path = tmp_path / "mutated.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    profile = _load_only_config_errors(path)
    if profile is not None:  # whatever loads survives a round trip through its own dump unchanged
        again = tmp_path / "again.yaml"
        again.write_text(yaml.safe_dump(profile.model_dump(mode="json")))
        assert load_target(str(again)).digest() == profile.digest()


# YAML token soup: anchors, aliases, tags (python ones included), flow and block syntax, merge keys.
_TOKENS = [
    "name: ", "hardware:", "  cores: ", "  arch: ", "pruning: {target: {metric: macs, keep: ", "}}",
    "quantize: {precisions: [", "], ship: ", "&a ", "*a", "&b ", "*b", "<<: *a", "!!python/object/apply:os.system ",
    "!!python/name:os.system", "!!binary ", "!!set ", "!!omap ", "!!timestamp ", "!!float ", "!!int ", "!!str ",
    "!custom ", "? ", ": ", "- ", "[", "]", "{", "}", ", ", "\n", "\n  ", "\n    ", "'", '"', "#", "---\n", "...",
    "|\n  ", ">\n  ", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "null", "~", "yes", "no", ".nan", ".inf", "-.inf",
    "0x1F", "0o17", "1_000", "1e309", "2001-12-14", "x86_64", "int8", "fp16", "edgetpu", "ssh", "\t", "\\", "%",
    "@", "`", "\x00", "\ufeff", "é",
]  # fmt: skip
_tokens = st.sampled_from(_TOKENS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_tokens | st.text(max_size=6), max_size=40))
def test_fuzz_random_yaml_documents_raise_only_target_config_error(tmp_path: Path, parts: list[str]) -> None:
    path = tmp_path / "random.yaml"
    path.write_text("".join(parts), encoding="utf-8", errors="surrogatepass")
    _load_only_config_errors(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_values)
def test_fuzz_random_structures_raise_only_target_config_error(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "structure.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _load_only_config_errors(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300))
def test_fuzz_random_bytes_raise_only_target_config_error(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "bytes.yaml"
    path.write_bytes(blob)
    _load_only_config_errors(path)


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=300))
def test_fuzz_target_names_raise_only_target_config_error(name: str) -> None:
    try:
        profile = load_target(name)
    except TargetConfigError:
        return
    assert name in available_targets() or Path(name).is_file()
    assert isinstance(profile, TargetProfile)
