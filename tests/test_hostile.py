"""Fault suite, hostile input: nothing from a profile, an option or a file name reaches a shell or is run as
code. A source guard over pipeline/ (tokens and AST), and behaviour: metacharacters in CLI values and
profiles create nothing, Python YAML tags are refused while the same document does run code under
yaml.unsafe_load.

Rows of docs/FAULTS.md ("Hostile input").
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.errors import PruningError, TargetConfigError
from pipeline.models.checkpoint import save_checkpoint
from pipeline.targets import TARGETS_DIR, load_target
from tests.conftest import needs_fmnist, tiny_resnet
from tests.tiny_models import prune_cfg

REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "pipeline"


# ====================================================================== source guard


def _code_only(source: str) -> str:
    """The source with comments and string literals (docstrings included) removed: what actually runs."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            continue
        out.append(tok.string)
    return " ".join(out)


GREP_BANNED = [r"shell\s*=\s*True", r"\bos\s*\.\s*system\b", r"\bos\s*\.\s*popen\b"]

# module.function calls that hand a string to a shell, or turn bytes into running code
BANNED_CALLS = {
    ("os", "system"): "runs a shell",
    ("os", "popen"): "runs a shell",
    ("subprocess", "getoutput"): "runs a shell",
    ("subprocess", "getstatusoutput"): "runs a shell",
    ("pickle", "load"): "unpickling runs code",
    ("pickle", "loads"): "unpickling runs code",
    ("marshal", "loads"): "loads code objects",
    ("yaml", "load"): "YAML tags can build Python objects (use yaml.safe_load)",
    ("yaml", "load_all"): "YAML tags can build Python objects",
    ("yaml", "full_load"): "YAML tags can build Python objects",
    ("yaml", "unsafe_load"): "YAML tags can build Python objects",
    ("yaml", "unsafe_load_all"): "YAML tags can build Python objects",
}
BANNED_BUILTINS = {"eval", "exec"}


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every shell or code-execution hazard in `source`, as `file:line: what`."""
    found = [f"{filename}: grep {pat!r}" for pat in GREP_BANNED if re.search(pat, _code_only(source))]
    tree = ast.parse(source, filename)
    imported: dict[str, tuple[str, str]] = {}  # `from os import system as s` -> {"s": ("os", "system")}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                key = (node.module.split(".")[0], alias.name)
                if key in BANNED_CALLS:
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {alias.name}")
                imported[alias.asname or alias.name] = key
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            call = (func.value.id, func.attr)
        elif isinstance(func, ast.Name):
            call = imported.get(func.id, ("", func.id))
        else:
            call = ("", "")
        if call in BANNED_CALLS:
            found.append(f"{where}: {'.'.join(call)}(): {BANNED_CALLS[call]}")
        if call[0] == "" and call[1] in BANNED_BUILTINS:
            found.append(f"{where}: {call[1]}(): runs a string as code")
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{where}: shell= other than False")
            if kw.arg is None and isinstance(kw.value, ast.Dict):
                keys = [k.value for k in kw.value.keys if isinstance(k, ast.Constant)]
                if "shell" in keys:
                    found.append(f"{where}: **{{'shell': ...}}")
        if call == ("torch", "load"):
            wo = next((kw.value for kw in node.keywords if kw.arg == "weights_only"), None)
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if call in (("np", "load"), ("numpy", "load")):
            ap = next((kw.value for kw in node.keywords if kw.arg == "allow_pickle"), None)
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append(f"{where}: np.load with allow_pickle")
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PIPELINE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_shell_and_no_code_execution_anywhere_in_pipeline() -> None:
    files = _sources()
    assert len(files) > 40  # the guard really reads the package (devices/, ship/, stages/, ...)
    found = [v for p in files for v in violations(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import subprocess\nsubprocess.run('ls', shell=True)\n",
        "import subprocess\nsubprocess.Popen(['ls'], shell=1)\n",
        "import subprocess\nopts = True\nsubprocess.call('ls', shell=opts)\n",
        "import subprocess\nsubprocess.run('ls', **{'shell': True})\n",
        "import os\nos.system('ls')\n",
        "import os\nos.popen('ls').read()\n",
        "from os import system as run\nrun('ls')\n",
        "import subprocess\nsubprocess.getoutput('ls')\n",
        "eval(input())\n",
        "exec(open('x').read())\n",
        "import pickle\npickle.loads(b'')\n",
        "import yaml\nyaml.load(open('p.yaml'), Loader=yaml.Loader)\n",
        "import yaml\nyaml.unsafe_load('x')\n",
        "import torch\ntorch.load('m.pt')\n",
        "import torch\ntorch.load('m.pt', weights_only=False)\n",
        "import numpy as np\nnp.load('c.npz', allow_pickle=True)\n",
    ],
)
def test_the_guard_catches_each_hazard(snippet: str) -> None:
    assert violations(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        '"""We never use shell=True or os.system here."""\n',
        "# os.popen would be wrong\nx = 1\n",
        "import subprocess\nsubprocess.run(['ls', '-l'], shell=False, check=True)\n",
        "import yaml\nyaml.safe_load('a: 1')\n",
        "import torch\ntorch.load('m.pt', map_location='cpu', weights_only=True)\n",
        "import numpy as np\nnp.load('c.npz', allow_pickle=False)\n",
        "msg = f'run with shell=True is {1}'\n",
    ],
)
def test_the_guard_ignores_text_and_safe_calls(snippet: str) -> None:
    assert violations(snippet) == []


# ====================================================================== metacharacters in CLI values


def _payloads(tmp_path: Path) -> tuple[str, list[Path]]:
    """A value that creates four marker files if any shell ever sees it, and those markers."""
    m = [tmp_path / f"pwned{i}" for i in range(4)]
    return f"x; touch {m[0]} && $(touch {m[1]}) `touch {m[2]}` | touch {m[3]} > /dev/null &", m


def _edgeship(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def test_metacharacters_in_a_target_name_create_nothing(tmp_path: Path) -> None:
    value, markers = _payloads(tmp_path)
    for target in (value, value.replace("/", "_"), f"{value}.yaml"):
        proc = _edgeship("targets", target)
        assert proc.returncode == 2 and "edgeship: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(m.exists() for m in markers)


def test_metacharacters_in_a_checkpoint_path_create_nothing(tmp_path: Path) -> None:
    value, markers = _payloads(tmp_path)
    proc = _edgeship("deploy", "--target", "host", "--checkpoint", value, "--runs-dir", str(tmp_path / "runs"),
                     "--artifacts-dir", str(tmp_path / "art"))  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert f"edgeship: error: {value}: no such checkpoint file" in proc.stderr
    assert not any(m.exists() for m in markers)


@needs_fmnist
def test_metacharacters_in_data_and_calibration_paths_create_nothing(tmp_path: Path) -> None:
    value, markers = _payloads(tmp_path)
    common = ["--runs-dir", str(tmp_path / "runs"), "--artifacts-dir", str(tmp_path / "art"), "--test-images", "50"]
    proc = _edgeship("deploy", "--target", "host", "--calibration", value, *common)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"edgeship: error: {value}: no such calibration file" in proc.stderr
    assert "Traceback" not in proc.stderr
    save_checkpoint(tiny_resnet(), tmp_path / "user.pt", meta={})  # so that the data folder is what is refused
    proc = _edgeship("deploy", "--target", "host", "--model", "tests.conftest:tiny_resnet", "--checkpoint",
                     str(tmp_path / "user.pt"), "--data", value, "--input-shape", "1x28x28", "--mean", "0.5",
                     "--std", "0.5", *common)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    said = rf"edgeship: error: {re.escape(value)}/(test|train): no such folder; --data DIR needs DIR/\1/<class>/"
    assert re.search(said, proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not any(m.exists() for m in markers)
    assert not (tmp_path / "art").exists()


# ====================================================================== metacharacters in profiles


def _profile(tmp_path: Path, **sections: object) -> Path:
    data = yaml.safe_load((TARGETS_DIR / "host.yaml").read_text())
    data.update(sections)
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"kind": "ssh", "host": "{v}"}, "transport -> host"),
        ({"kind": "ssh", "host": "pi", "user": "{v}"}, "transport -> user"),
        ({"kind": "ssh", "host": "pi", "python": "{v}"}, "transport -> python"),
        ({"kind": "ssh", "host": "pi", "workdir": "/tmp/{v}"}, "transport -> workdir"),
        ({"kind": "adb", "serial": "{v}"}, "transport -> serial"),
        ({"kind": "adb", "workdir": "/data/{v}"}, "transport -> workdir"),
    ],
)
def test_device_fields_with_metacharacters_are_refused(tmp_path: Path, section: dict, field: str) -> None:
    value, markers = _payloads(tmp_path)
    transport = {k: v.replace("{v}", value) for k, v in section.items()}
    with pytest.raises(TargetConfigError, match=rf"{field}: String should match pattern"):
        load_target(str(_profile(tmp_path, transport=transport)))
    assert not any(m.exists() for m in markers)


def test_profile_name_with_metacharacters_is_refused(tmp_path: Path) -> None:
    value, markers = _payloads(tmp_path)
    with pytest.raises(TargetConfigError, match=r"name: String should match pattern"):
        load_target(str(_profile(tmp_path, name=value)))
    assert not any(m.exists() for m in markers)


def test_free_text_fields_are_kept_verbatim_and_never_run(tmp_path: Path) -> None:
    """description and hardware.cpu are free text: accepted, printed as given, never executed."""
    value, markers = _payloads(tmp_path)
    hardware = yaml.safe_load((TARGETS_DIR / "host.yaml").read_text())["hardware"] | {"cpu": value}
    path = _profile(tmp_path, description=value, hardware=hardware)
    assert load_target(str(path)).description == value
    proc = _edgeship("targets", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(value) == 2
    assert not any(m.exists() for m in markers)


def test_keep_layers_with_metacharacters_are_only_looked_up(tmp_path: Path) -> None:
    value, markers = _payloads(tmp_path)
    from pipeline.pruning.channels import prune_to_target

    with pytest.raises(PruningError, match=r"pruning.keep_layers: the model has no layer 'x; touch"):
        prune_to_target(tiny_resnet(), torch.zeros(1, 1, 28, 28), prune_cfg(metric="macs", keep=0.5, channel_multiple=4,
                        keep_layers=[value]))  # fmt: skip
    assert not any(m.exists() for m in markers)


# ====================================================================== YAML tags are never evaluated


_TAGS = {
    "apply-system": "name: !!python/object/apply:os.system ['touch {m}']\n",
    "apply-popen": "name: !!python/object/apply:subprocess.Popen [['touch', '{m}']]\n",
    "new-system": "name: !!python/object/new:os.system ['touch {m}']\n",
    "apply-exec": "name: !!python/object/apply:builtins.exec [\"open('{m}', 'w').write('x')\"]\n",
    "nested": "name: host\nhardware: {{cpu: !!python/object/apply:os.system ['touch {m}']}}\n",
    "alias": "x: &cmd !!python/object/apply:os.system ['touch {m}']\nname: *cmd\n",
}


@pytest.mark.parametrize("kind", sorted(_TAGS))
def test_python_yaml_tags_are_refused_and_never_run(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / f"pwned-{kind}"
    path = tmp_path / "tagged.yaml"
    path.write_text(_TAGS[kind].format(m=marker))
    with pytest.raises(TargetConfigError, match=r"not valid YAML: could not determine a constructor for the tag"):
        load_target(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["apply-system", "apply-exec", "alias"])
def test_the_refused_yaml_payload_is_live(tmp_path: Path, kind: str) -> None:
    """Control: the same documents under yaml.unsafe_load do run (so the test above could fail)."""
    marker = tmp_path / f"pwned-{kind}"
    path = tmp_path / "tagged.yaml"
    path.write_text(_TAGS[kind].format(m=marker))
    subprocess.run([sys.executable, "-c", "import sys, yaml; yaml.unsafe_load(open(sys.argv[1]))", str(path)],
                   check=True, timeout=60)  # fmt: skip
    assert marker.exists()


def test_python_tags_in_the_cli_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned-cli"
    path = tmp_path / "tagged.yaml"
    path.write_text(_TAGS["apply-system"].format(m=marker))
    proc = _edgeship("targets", str(path))
    assert proc.returncode == 2
    assert f"edgeship: error: {path}: not valid YAML: could not determine a constructor" in proc.stderr
    assert not marker.exists()
