"""The Python API (pipeline/__init__.py, pipeline/api.py): deploy an nn.Module and Datasets held in memory.

Fast: `import pipeline` stays light, the API names survive their subpackages' imports, the in-memory model's
cache key, Dataset conversion, and the errors (wrong image shape, outputs that are not the classes) that the CLI
gives too. Slow: the same tiny model and images through the CLI (checkpoint + image folder) and through the API
(nn.Module + Datasets) give the same figures; a rerun is served from the cache, a model one weight apart is not;
nothing is printed; the notebook-style example runs.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from pipeline.cli import main
from pipeline.errors import BudgetError, DatasetError, ShipError, TargetConfigError, UsageError
from tests.tiny_models import has_fashion_mnist, tiny_resnet

REPO = Path(__file__).resolve().parent.parent
FACTORY = "tests.conftest:tiny_resnet"  # 10 outputs, 1x28x28 input
SHAPE, MEAN, STD = (1, 28, 28), 0.286, 0.353
CLASSES = tuple(f"c{i}" for i in range(10))
# The host profile made tiny (uniform allocation: no sensitivity stage; two precisions; short fine-tune and
# profiling), given as --set items to the CLI and as the same settings in a dict to the API.
TINY = {
    "budgets.max_accuracy_drop": 1.0, "budgets.latency_ms": None, "budgets.max_size_kb": None,
    "pruning.allocation": "uniform", "pruning.channel_multiple": 4,
    "finetune.epochs": 1, "finetune.max_train_images": 256, "finetune.batch_size": 64, "finetune.min_steps": 20,
    "quantize.precisions": ["fp32", "int8"], "quantize.calibration_images": 32, "quantize.min_agreement": 0.9,
    "profiling.threads": 1, "profiling.warmup": 2, "profiling.runs": 10, "profiling.min_seconds": 0.2,
}  # fmt: skip
TINY_SET = [f"{k}={'' if v is None else '[fp32, int8]' if isinstance(v, list) else v}" for k, v in TINY.items()]
STAGES = ["baseline", "export_baseline", "convert_baseline", "prune", "finetune", "export", "convert", "verify",
          "profile"]  # fmt: skip


def _cli(tmp: Path, *extra: str) -> list[str]:
    return ["deploy", "--target", "host", "--model", FACTORY, "--input-shape", "1x28x28", "--mean", str(MEAN),
            "--std", str(STD), "--runs-dir", str(tmp / "runs"), "--artifacts-dir", str(tmp / "art"),
            *extra]  # fmt: skip


def _random_folder(root: Path, classes: list[str], n: int = 2) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(root / split / c / f"{i}.png"), rng.integers(0, 255, (28, 28), dtype=np.uint8))
    return root


# ====================================================================== the package (fast)


def test_import_pipeline_loads_neither_torch_nor_tensorflow() -> None:
    code = ("import sys, pipeline; heavy = [m for m in ('torch', 'tensorflow', 'numpy', 'onnx') if m in sys.modules];"
            "print(heavy, callable(pipeline.deploy), pipeline.__version__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["[]", "True", pipeline.__version__]


def test_the_api_names_survive_their_subpackages_being_imported() -> None:
    import pipeline.deploy as chain  # binds the subpackage on `pipeline`: the name must stay the function
    import pipeline.ship.copy as ship_copy
    from pipeline.deploy import deploy as walk_chain

    assert callable(pipeline.deploy) and callable(pipeline.ship)
    assert pipeline.deploy.__wrapped__.__module__ == "pipeline.api"
    assert walk_chain.__module__ == "pipeline.deploy" and chain.REPO == REPO  # the module's names reach through
    assert ship_copy is sys.modules["pipeline.ship.copy"]
    import inspect

    assert list(inspect.signature(pipeline.deploy).parameters)[:3] == ["model", "target", "data"]


def test_model_key_follows_weights_and_structure() -> None:
    from pipeline.models.memory import model_key

    a = tiny_resnet()
    b = copy.deepcopy(a)
    assert model_key(a) == model_key(b) == model_key(tiny_resnet())  # same weights: same key
    with torch.no_grad():
        b.head[-1].bias[3] += 1e-6  # one weight of 11k, by a hair
    assert model_key(b) != model_key(a)
    c = copy.deepcopy(a)
    c.head[2] = torch.nn.ReLU6()  # same state_dict, another structure
    assert c.state_dict().keys() == a.state_dict().keys() and model_key(c) != model_key(a)


def test_in_memory_model_checkpoint_is_named_by_its_key_and_loads_into_build(tmp_path: Path) -> None:
    from pipeline.models.checkpoint import load_checkpoint
    from pipeline.models.memory import memory_checkpoint, memory_spec

    model = tiny_resnet(seed=4)
    spec = memory_spec(model, input_shape=SHAPE, mean=(MEAN,), std=(STD,), class_names=CLASSES)
    path = memory_checkpoint(spec, tmp_path)
    assert path.parent == tmp_path / "inputs" and memory_checkpoint(spec, tmp_path) == path
    with torch.no_grad():
        model.stem[0].weight[0, 0, 0, 0] += 1.0  # the caller changes its module after the spec was made
    loaded, meta = load_checkpoint(path, spec.build())
    x = torch.randn(2, *SHAPE)
    assert torch.equal(loaded(x), tiny_resnet(seed=4)(x)) and meta["source"] == "in memory"
    other = memory_checkpoint(memory_spec(model, input_shape=SHAPE, mean=(MEAN,), std=(STD,), class_names=CLASSES),
                              tmp_path)  # fmt: skip
    assert other != path and sorted(p.name for p in (tmp_path / "inputs").iterdir()) == sorted([path.name, other.name])
    # edited again and again: only the KEEP most recently used checkpoints stay
    from pipeline.models.memory import KEEP

    made = [other]
    for _ in range(KEEP + 1):
        with torch.no_grad():
            model.stem[0].weight[0, 0, 0, 0] += 1.0
        made.append(memory_checkpoint(memory_spec(model, input_shape=SHAPE, mean=(MEAN,), std=(STD,),
                                                  class_names=CLASSES), tmp_path))  # fmt: skip
    left = sorted(p.name for p in (tmp_path / "inputs").iterdir())
    assert left == sorted(p.name for p in made[-KEEP:]) and len(set(made)) == KEEP + 2


@pytest.mark.parametrize("layout", ["uint8 HWC array", "float CHW tensor", "uint8 CHW tensor", "PIL", "2-D array"])
def test_dataset_images_become_the_pipelines_uint8_nhwc(layout: str) -> None:
    from PIL import Image

    from pipeline.data.dataset import to_imageset
    from pipeline.models.spec import ModelSpec

    spec = ModelSpec("m", tiny_resnet, SHAPE, (MEAN,), (STD,), CLASSES)
    pixels = np.random.default_rng(1).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    as_item = {
        "uint8 HWC array": lambda p: p,
        "float CHW tensor": lambda p: torch.from_numpy(p).permute(2, 0, 1).float() / 255,
        "uint8 CHW tensor": lambda p: torch.from_numpy(p).permute(2, 0, 1),
        "PIL": lambda p: Image.fromarray(p[..., 0]),
        "2-D array": lambda p: p[..., 0],
    }[layout]
    items = [(as_item(p), torch.tensor(i)) for i, p in enumerate(pixels)]
    got = to_imageset(items, spec, split="train")
    assert np.array_equal(got.images, pixels) and got.labels.tolist() == [0, 1, 2, 3, 4]
    assert re.fullmatch(r"list \(train\), 5 images, sha256 [0-9a-f]{16}", got.source)
    pixels[0, 0, 0, 0] ^= 1  # one pixel changes the name, hence the stages' cache keys
    assert to_imageset([(as_item(p), i) for i, p in enumerate(pixels)], spec, split="train").source != got.source


def test_normalized_or_badly_labelled_items_are_refused_with_the_item_named() -> None:
    from pipeline.data.dataset import to_imageset
    from pipeline.models.spec import ModelSpec

    spec = ModelSpec("m", tiny_resnet, SHAPE, (MEAN,), (STD,), CLASSES)
    good, normalized = torch.full((1, 28, 28), 0.5), torch.linspace(-2, 1.5, 784).reshape(1, 28, 28)
    with pytest.raises(DatasetError, match=r"item 1: float pixels from -2 to 1\.5; .*no Normalize transform"):
        to_imageset([(good, 0), (normalized, 0)], spec, split="train")
    with pytest.raises(DatasetError, match=r"item 0: label 10 is not one of the model's 10 classes \(0\.\.9\)"):
        to_imageset([(good, 10)], spec, split="test")
    with pytest.raises(DatasetError, match=r"item 0 is a Tensor; each item must be \(image, label\)"):
        to_imageset([good], spec, split="test")


def test_in_memory_data_is_planned_with_its_fingerprint_in_every_name(tmp_path: Path) -> None:
    from pipeline.api import build_request

    rng = np.random.default_rng(3)
    items = [(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), i % 10) for i in range(100)]
    req = build_request(tiny_resnet(), "host", data={"train": items[:80], "test": items[80:]}, classes=CLASSES,
                        input_shape=SHAPE, mean=MEAN, std=STD, runs_dir=tmp_path)  # fmt: skip
    plan, names = req.data, req.data.describe()
    assert len(plan.train) == 70 and len(plan.val) == 10 and len(plan.test) == 20  # val: one of each class's 8
    assert plan.calibration is plan.train_set  # no calibration=: the training images
    assert names["calibration"] == plan.train_set.source and "sha256" in names["test"] and "sha256" in names["val"]
    assert req.checkpoint.parent == tmp_path / "host" / "inputs" and req.spec.name == "TinyResNet"
    single = build_request(tiny_resnet(), "host", data=items, classes=CLASSES, input_shape=SHAPE, mean=MEAN, std=STD,
                           runs_dir=tmp_path).data  # fmt: skip
    assert len(single.test) == 20 and sorted(np.bincount(single.test.labels)) == [2] * 10  # a fifth of each class
    assert single.describe()["test"].endswith("[test: 20]") and "100 images, sha256" in single.describe()["test"]
    items[0][0][0, 0, 0] ^= 1  # one pixel of the training images: the names, hence the stages' keys, change
    again = build_request(tiny_resnet(), "host", data={"train": items[:80], "test": items[80:]}, classes=CLASSES,
                          input_shape=SHAPE, mean=MEAN, std=STD, runs_dir=tmp_path).data.describe()  # fmt: skip
    assert again["train"] != names["train"] and again["val"] != names["val"] and again["test"] == names["test"]


def test_overrides_are_checked_like_set(tmp_path: Path) -> None:
    base = pipeline.load_target("host")
    tiny = pipeline.load_target("host", TINY)
    assert tiny == pipeline.load_target("host", TINY_SET)  # the dict and the --set strings: one profile
    assert tiny.quantize.precisions == ("fp32", "int8") and tiny.budgets.latency_ms is None
    assert pipeline.load_target(base, {"finetune.epochs": 0.2}).finetune.epochs == 0.2  # a profile + overrides
    with pytest.raises(TargetConfigError, match=r"finetune -> epochs: .*less than or equal to 100"):
        pipeline.load_target(base, {"finetune.epochs": 1000})
    with pytest.raises(TargetConfigError, match=r"finetune -> epocs: unknown field; valid fields here: .*epochs"):
        pipeline.load_target("host", {"finetune.epocs": 1})
    with pytest.raises(TargetConfigError, match=r"^profile host: finetune -> epocs: unknown field"):
        pipeline.load_target(base, ["finetune.epocs=1"])
    with pytest.raises(TargetConfigError, match=r"expected field.path=value"):
        pipeline.load_target("host", {"Finetune.epochs": 1})


# ====================================================================== errors the CLI gives too (fast)


def test_outputs_that_are_not_the_classes_get_the_clis_error(tmp_path: Path, capsys) -> None:
    data = _random_folder(tmp_path / "data", ["a", "b", "c"])
    assert main(_cli(tmp_path, "--data", str(data))) == 2
    cli = capsys.readouterr().err.strip().removeprefix("edgeship: error: ")
    assert "has 10 outputs but" in cli and "names 3 classes (a, b, c)" in cli
    with pytest.raises(UsageError) as by_name:
        pipeline.deploy(FACTORY, "host", data=data, input_shape=SHAPE, mean=MEAN, std=STD, runs_dir=tmp_path / "r")
    assert str(by_name.value) == cli.replace("--classes FILE", "classes=[names]")
    with pytest.raises(UsageError) as in_memory:
        pipeline.deploy(tiny_resnet(), "host", data=data, input_shape=SHAPE, mean=MEAN, std=STD,
                        runs_dir=tmp_path / "r")  # fmt: skip
    assert str(in_memory.value) == str(by_name.value).replace("tests.conftest.tiny_resnet", "TinyResNet")
    with pytest.raises(UsageError, match=r"^model TinyResNet has 10 outputs but classes= names 3 classes \(a, b, c\): "
                                         r"make classes= list the model's 10 classes in output order$"):  # fmt: skip
        pipeline.deploy(tiny_resnet(), "host", data={"train": [(np.zeros((28, 28, 1), np.uint8), 0)] * 4,
                        "test": [(np.zeros((28, 28, 1), np.uint8), 1)] * 2}, classes=["a", "b", "c"],
                        input_shape=SHAPE, mean=MEAN, std=STD, runs_dir=tmp_path / "r")  # fmt: skip
    assert not (tmp_path / "r").exists()  # refused before anything was written, the model's checkpoint included
    assert capsys.readouterr() == ("", "")


def test_a_wrong_image_shape_gets_the_clis_error(tmp_path: Path, capsys) -> None:
    """The CLI meets a wrong shape in a calibration .npz (folders are resized); the API in any Dataset, before
    any stage. Both messages come from ModelSpec.check_images."""
    data = _random_folder(tmp_path / "data", CLASSES)
    wrong = np.random.default_rng(2).integers(0, 256, (12, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "calib.npz", images=wrong)
    ckpt = tmp_path / "tiny.pt"
    from pipeline.models.checkpoint import save_checkpoint

    save_checkpoint(tiny_resnet(), ckpt, meta={})
    assert main(_cli(tmp_path, "--data", str(data), "--checkpoint", str(ckpt), "--calibration",
                     str(tmp_path / "calib.npz"), "--test-images", "10")) == 1  # fmt: skip
    cli = capsys.readouterr().err
    template = (r"(.+): images are \(32, 32, 1\) \(HWC\), model (\S+) wants \(28, 28, 1\); resize the images or "
                r"pick the model that matches them")  # fmt: skip
    assert re.search(template, cli), cli
    items = [(torch.from_numpy(w).permute(2, 0, 1), i % 10) for i, w in enumerate(wrong)]
    for kwargs in ({"data": {"train": items, "test": items}}, {"data": data, "calibration": [w for w, _ in items]}):
        with pytest.raises(DatasetError) as exc:
            pipeline.deploy(tiny_resnet(), "host", input_shape=SHAPE, mean=MEAN, std=STD, classes=CLASSES,
                            runs_dir=tmp_path / "api", **kwargs)  # fmt: skip
        m = re.fullmatch(template, str(exc.value))
        assert m and m.group(2) == "TinyResNet" and "12 images, sha256" in m.group(1), str(exc.value)
    assert not list((tmp_path / "api").glob("host/*/manifest.json"))  # no stage ran
    assert capsys.readouterr() == ("", "")


def test_the_api_raises_instead_of_exiting(tmp_path: Path, capsys) -> None:
    """The package's own errors, with the CLI's messages in the API's words; never SystemExit, nothing printed."""
    for call, error, want in (
        (
            lambda: pipeline.deploy("fmnist_cn", "host"),
            UsageError,
            "unknown model 'fmnist_cn'. Did you mean 'fmnist_cnn'?",
        ),
        (lambda: pipeline.deploy("fmnist_cnn", "no-such-target"), TargetConfigError, "no-such-target"),
        (
            lambda: pipeline.deploy(tiny_resnet(), "host", data=tmp_path),
            UsageError,
            "a user model (an nn.Module or 'package.module:factory') also needs input_shape=, mean= and std=",
        ),
        (
            lambda: pipeline.deploy(tiny_resnet(), "host", input_shape=SHAPE, mean=MEAN, std=STD),
            UsageError,
            "a user model needs data=: an image folder DIR",
        ),
        (
            lambda: pipeline.deploy(tiny_resnet(), "host", data=tmp_path, input_shape=SHAPE, mean=MEAN, std=STD),
            DatasetError,
            f"{tmp_path / 'train'}: no such folder; data=DIR needs DIR/train/<class>/ images",
        ),
        (
            lambda: pipeline.deploy("fmnist_cnn", "host", classes=["a", "b"]),
            UsageError,
            "classes= is for your own model (an nn.Module or 'package.module:factory'); built-in models name theirs",
        ),
        (lambda: pipeline.deploy("fmnist_cnn", "host", test_images=0), UsageError, "test_images= must be at least 1"),
        (
            lambda: pipeline.profile(tmp_path / "none.tflite", target="host", runs_dir=tmp_path),
            UsageError,
            "none.tflite: no such model",
        ),
        (lambda: pipeline.ship(tmp_path / "no-bundle", tmp_path), ShipError, "no-bundle: no published bundle"),
    ):
        with pytest.raises(error) as exc:
            call()
        assert want in str(exc.value)
    assert capsys.readouterr() == ("", "")
    assert not (tmp_path / "host").exists()


# ====================================================================== CLI and API, real deploys (slow)


def _train(seed: int = 0) -> torch.nn.Module:
    from tests.tiny_models import read_fashion_mnist

    data = read_fashion_mnist("train", 1000)
    torch.manual_seed(seed)
    model = tiny_resnet(seed).train()
    x = (torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    y = torch.from_numpy(data.labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(60):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _folder_from_fmnist(root: Path) -> Path:
    """train/test/calibration image folders (PNG) from real Fashion-MNIST, classes c0..c9."""
    from tests.tiny_models import write_fmnist_folder

    return write_fmnist_folder(root, pool=1600, train=400, test=300)


def _datasets(folder: Path) -> dict[str, torch.utils.data.Dataset]:
    """The folder's images, in the order the CLI reads them, as the Datasets a notebook holds: CHW 0-1 tensors."""
    from pipeline.data.image_folder import load_image_folder

    out = {}
    for split in ("train", "test", "calibration"):
        s = load_image_folder(folder / split, size=(28, 28), channels=1)
        x = torch.from_numpy(s.images).permute(0, 3, 1, 2).float() / 255
        out[split] = torch.utils.data.TensorDataset(x, torch.from_numpy(s.labels))
    return out


def _figures(s: dict) -> dict:
    pick = ("size_bytes", "accuracy", "agreement", "max_abs_diff")
    return {
        "baseline": {k: s["baseline"][k] for k in ("macs", "params", "accuracy_torch")},
        "pruned": {k: s["pruned"][k] for k in ("macs", "params", "accuracy_torch", "accuracy_torch_before_finetune",
                                               "finetune_steps", "keep_achieved", "layers")},
        "baseline_tflite": {k: s["baseline"]["tflite"][k] for k in pick},
        "variants": {p: {k: v[k] for k in pick} for p, v in s["variants"].items()},
        "images": (s["test_images"], s["val_images"]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not has_fashion_mnist():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    import json

    from pipeline.models.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("api")
    model, folder = _train(), _folder_from_fmnist(tmp / "data")
    save_checkpoint(model, tmp / "tiny.pt", meta={})
    cli_dir = tmp / "cli"
    argv = _cli(cli_dir, "--checkpoint", str(tmp / "tiny.pt"), "--data", str(folder), "--test-images", "200")
    assert main([*argv, *(a for item in TINY_SET for a in ("--set", item))]) == 0
    cli = json.loads((cli_dir / "runs" / "host" / "summary.json").read_text())
    sets = _datasets(folder)
    api_dir = tmp / "api"
    seen: list[tuple[str, bool]] = []

    def kwargs(progress=None) -> dict:
        return dict(data={"train": sets["train"], "test": sets["test"]}, calibration=sets["calibration"],
                    input_shape=SHAPE, mean=MEAN, std=STD, classes=CLASSES, overrides=TINY, test_images=200,
                    runs_dir=api_dir / "runs", artifacts_dir=api_dir / "art", progress=progress)  # fmt: skip

    result = pipeline.deploy(model, "host", **kwargs(lambda name, rec: seen.append((name, rec.skipped))))
    return {"tmp": tmp, "model": model, "cli": cli, "api": result, "seen": seen, "kwargs": kwargs, "sets": sets}


@pytest.mark.slow
def test_the_api_and_the_cli_give_the_same_figures(deployed: dict) -> None:
    api, cli = deployed["api"].summary, deployed["cli"]
    assert deployed["seen"] == [(s, False) for s in STAGES]
    assert _figures(api) == _figures(cli)
    b = cli["baseline"]
    assert b["macs"] > 1_000_000 and b["accuracy_torch"] > 0.5  # a real model that learned from real data
    assert api["pruned"]["macs"] <= 0.55 * b["macs"]
    assert api["model"] == "TinyResNet" and cli["model"] == "tests.conftest.tiny_resnet"
    assert re.fullmatch(r"TensorDataset \(test\), 300 images, sha256 [0-9a-f]{16}( \(subset.*)?", api["data"]["test"])


@pytest.mark.slow
def test_the_result_has_typed_figures(deployed: dict) -> None:
    r, s = deployed["api"], deployed["api"].summary
    assert r.bundle.is_dir() and r.report == r.bundle / "report.md" and r.report_html.is_file()
    assert set(r.figures) == {"fp32", "int8"} and r.shipped_precision == "int8"
    assert (
        r.figures["int8"].size_bytes
        == s["variants"]["int8"]["size_bytes"]
        == (r.bundle / "model.tflite").stat().st_size
    )
    assert r.figures["int8"].accuracy == s["variants"]["int8"]["accuracy"]
    assert r.baseline.latency_p50_ms == s["baseline"]["tflite"]["latency_ms"]["p50"] > 0
    assert r.macs == (s["baseline"]["macs"], s["pruned"]["macs"]) and r.params[1] < r.params[0]
    assert [b.name for b in r.budgets] == ["accuracy drop", "int8 agreement (val)"]
    assert all(b.status == "met" for b in r.budgets)
    assert "local" in r.measured_on
    table = r.table()
    assert table.splitlines()[0].split() == ["variant", "size", "B", "accuracy", "agreement", "p50", "ms", "p99", "ms"]
    assert f"{r.figures['int8'].size_bytes:,}" in table and "budget accuracy drop" in table


@pytest.mark.slow
def test_a_rerun_is_served_from_the_cache_and_one_weight_apart_is_not(deployed: dict, capsys) -> None:
    capsys.readouterr()
    seen: list[tuple[str, bool]] = []
    again = pipeline.deploy(copy.deepcopy(deployed["model"]), "host",
                            **deployed["kwargs"](lambda n, rec: seen.append((n, rec.skipped))))  # fmt: skip
    assert seen == [(s, True) for s in STAGES]  # the same weights: every stage up to date
    assert again.summary["variants"] == deployed["api"].summary["variants"]
    changed = copy.deepcopy(deployed["model"])
    with torch.no_grad():
        changed.head[-1].bias[0] += 1e-4

    class Stop(Exception):
        pass

    def stop_after_baseline(name: str, rec) -> None:
        seen.append((name, rec.skipped))
        raise Stop

    seen.clear()
    with pytest.raises(Stop):
        pipeline.deploy(changed, "host", **deployed["kwargs"](stop_after_baseline))
    assert seen == [("baseline", False)]  # one weight apart: measured again
    inputs = sorted(p.name for p in (deployed["tmp"] / "api" / "runs" / "host" / "inputs").iterdir())
    assert len(inputs) == 2 and all(re.fullmatch(r"model-[0-9a-f]{24}\.pt", n) for n in inputs)
    assert capsys.readouterr() == ("", "")


@pytest.mark.slow
def test_the_api_prints_nothing_and_raises_a_missed_budget(deployed: dict, capsys) -> None:
    capsys.readouterr()
    kwargs = deployed["kwargs"]()
    kwargs["overrides"] = {**TINY, "budgets.max_size_kb": 1}  # not in any stage's config: all stages cached
    with pytest.raises(BudgetError, match=r"size \(KiB\): .* vs limit 1\.0.*Nothing was published"):
        pipeline.deploy(deployed["model"], "host", **kwargs)
    assert capsys.readouterr() == ("", "")
    kwargs["progress"] = True  # asked for: the CLI's progress lines
    kwargs["overrides"] = TINY
    pipeline.deploy(deployed["model"], "host", **kwargs)
    out, err = capsys.readouterr()
    assert out == "" and re.findall(r"^  \[(\w+)\s*\] up to date$", err, re.M) == STAGES


@pytest.mark.slow
def test_profile_and_ship_take_the_result(deployed: dict, tmp_path: Path) -> None:
    r = deployed["api"]
    runs = pipeline.profile(r, "local", runs_dir=tmp_path / "runs")
    (run,) = runs.values()
    assert run.ok and run.results["model.tflite"]["latency_ms"]["p50"] > 0
    assert (tmp_path / "runs" / "host" / "profile-devices.json").is_file()  # the bundle's profile: host
    from tests.test_ship import android_app

    app = android_app(tmp_path / "app")
    shipped = pipeline.ship(r, app, name="tiny")
    assert shipped.app_kind == "android" and (shipped.destination / "model.tflite").is_file()
    assert shipped.note and "not for a phone" in shipped.note  # the same note as `edgeship ship`


@pytest.mark.slow
def test_the_notebook_style_example_runs(tmp_path: Path) -> None:
    if not has_fashion_mnist():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "notebook_style.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(r"^pruned int8\s+[\d,]+\s+0\.\d{4}", proc.stdout, re.M), proc.stdout
    assert (tmp_path / "artifacts" / "host" / "model.tflite").is_file()
    assert "budget accuracy drop" in proc.stdout
