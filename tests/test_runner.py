"""Stages run once per input/config, resume after a kill, and never leave half-written outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.artifacts import replace_dir, run_lock, write_bytes_atomic
from pipeline.errors import LockError
from pipeline.runner import run_stage


def _inputs(tmp_path: Path, text: str = "v1") -> dict[str, Path]:
    src = tmp_path / "input.txt"
    src.write_text(text)
    return {"src": src}


def test_skips_when_fresh_and_reruns_on_change(tmp_path: Path) -> None:
    calls = []

    def work(out: Path) -> dict:
        calls.append(1)
        (out / "result.txt").write_text("done")
        return {"n": len(calls)}

    run = tmp_path / "run"
    first = run_stage(run, "s", work, inputs=_inputs(tmp_path), config={"a": 1})
    again = run_stage(run, "s", work, inputs=_inputs(tmp_path), config={"a": 1})
    assert not first.skipped and again.skipped and again.figures == {"n": 1} and len(calls) == 1
    run_stage(run, "s", work, inputs=_inputs(tmp_path), config={"a": 2})
    assert len(calls) == 2
    run_stage(run, "s", work, inputs=_inputs(tmp_path, "v2"), config={"a": 2})
    assert len(calls) == 3
    manifest = json.loads((run / "s" / "manifest.json").read_text())
    assert manifest["outputs"]["result.txt"] and manifest["inputs"]["src"]["sha256"]
    assert "torch" in manifest["tools"]


def test_tampered_output_is_rebuilt(tmp_path: Path) -> None:
    calls = []

    def work(out: Path) -> dict:
        calls.append(1)
        (out / "result.txt").write_text("done")
        return {}

    run = tmp_path / "run"
    run_stage(run, "s", work, inputs=_inputs(tmp_path), config={})
    (run / "s" / "result.txt").write_text("half")
    run_stage(run, "s", work, inputs=_inputs(tmp_path), config={})
    assert len(calls) == 2 and (run / "s" / "result.txt").read_text() == "done"


def test_failing_stage_keeps_the_previous_result(tmp_path: Path) -> None:
    run = tmp_path / "run"

    def good(out: Path) -> dict:
        (out / "r.txt").write_text("good")
        return {}

    def bad(out: Path) -> dict:
        (out / "r.txt").write_text("partial")
        raise RuntimeError("boom")

    run_stage(run, "s", good, inputs=_inputs(tmp_path), config={"v": 1})
    with pytest.raises(RuntimeError):
        run_stage(run, "s", bad, inputs=_inputs(tmp_path), config={"v": 2})
    assert (run / "s" / "r.txt").read_text() == "good"
    assert json.loads((run / "s" / "manifest.json").read_text())["config"] == {"v": 1}


def test_kill_mid_stage_then_resume(tmp_path: Path) -> None:
    """A process killed with SIGKILL inside a stage leaves no finished-looking folder; a rerun completes it."""
    run = tmp_path / "run"
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from pipeline.runner import run_stage
        def work(out):
            (out / "r.txt").write_text("partial")
            if sys.argv[1] == "hang":
                Path({str(tmp_path / "started")!r}).write_text("x")
                time.sleep(60)
            (out / "r.txt").write_text("whole")
            return {{}}
        src = Path({str(tmp_path / "in.txt")!r}); src.write_text("in")
        run_stage(Path({str(run)!r}), "s", work, inputs={{"src": src}}, config={{}})
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script), "hang"])
    deadline = time.time() + 30
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (run / "s").exists()  # only the .s.tmp folder, which does not look finished
    subprocess.run([sys.executable, str(script), "ok"], check=True)
    assert (run / "s" / "r.txt").read_text() == "whole"
    assert not (run / ".s.tmp").exists()


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    write_bytes_atomic(target, b"old")

    with pytest.raises(TypeError):
        write_bytes_atomic(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_replace_dir(tmp_path: Path) -> None:
    dst = tmp_path / "bundle"
    dst.mkdir()
    (dst / "old").write_text("1")
    src = tmp_path / ".bundle.tmp"
    src.mkdir()
    (src / "new").write_text("2")
    replace_dir(src, dst)
    assert [p.name for p in dst.iterdir()] == ["new"] and not src.exists()
    assert not (tmp_path / ".bundle.old").exists()


def test_second_run_of_same_target_refuses(tmp_path: Path) -> None:
    code = (
        f"import sys, time; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); "
        f"from pipeline.artifacts import run_lock; from pathlib import Path\n"
        f"with run_lock(Path({str(tmp_path)!r})):\n    print('locked', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with (
            pytest.raises(LockError, match=rf"another edgeship run is using .* \(pid {proc.pid}\)"),
            run_lock(tmp_path),
        ):
            pass
    finally:
        proc.kill()
        proc.wait()
    with run_lock(tmp_path):  # released when the holder dies
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_publishers_of_the_same_bundle_take_turns(tmp_path: Path) -> None:
    """wait_lock (around publishing a bundle): a second holder waits for the first instead of interleaving."""
    from pipeline.artifacts import wait_lock

    log = tmp_path / "log"
    code = (
        f"import sys, time; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); "
        f"from pipeline.artifacts import wait_lock; from pathlib import Path\n"
        f"with wait_lock(Path({str(tmp_path / '.b.lock')!r})):\n"
        f"    print('locked', flush=True); time.sleep(1.0)\n"
        f"    open({str(log)!r}, 'a').write('first\\n')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with wait_lock(tmp_path / ".b.lock"), log.open("a") as fh:
            fh.write("second\n")
    finally:
        proc.wait(timeout=30)
    assert log.read_text().splitlines() == ["first", "second"]
