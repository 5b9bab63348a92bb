"""Model zoo and checkpoints: pruned shapes survive a round trip; corrupt, unsafe and foreign files are refused."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import CheckpointError, UsageError
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from pipeline.models.zoo import get_model_spec, load_factory, user_model_spec
from pipeline.pruning.channels import prune_to_target
from tests.conftest import needs_fmnist, tiny_resnet
from tests.tiny_models import prune_cfg

REPO = Path(__file__).resolve().parent.parent
X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_pruned_checkpoint_round_trip(tmp_path: Path) -> None:
    model = tiny_resnet()
    pruned = prune_to_target(model, X[:1], prune_cfg(metric="macs", keep=0.4, channel_multiple=4)).model
    save_checkpoint(pruned, tmp_path / "p.pt", meta={"note": "pruned"})
    loaded, meta = load_checkpoint(tmp_path / "p.pt", tiny_resnet(seed=5))
    assert meta == {"note": "pruned"}
    assert loaded.stem[0].out_channels == pruned.stem[0].out_channels < 16
    assert torch.equal(loaded(X), pruned(X))


def test_depthwise_groups_survive(tmp_path: Path) -> None:
    spec = get_model_spec("efficientnet_lite0")
    model = spec.build()
    block = model._blocks[1]
    with torch.no_grad():  # shrink one depthwise block by hand, as a pruner would
        keep = torch.arange(48)
        block._expand_conv.weight = torch.nn.Parameter(block._expand_conv.weight[keep])
        block._expand_conv.out_channels = 48
        for bn in (block._bn0, block._bn1):
            bn.weight, bn.bias = torch.nn.Parameter(bn.weight[keep]), torch.nn.Parameter(bn.bias[keep])
            bn.running_mean, bn.running_var, bn.num_features = bn.running_mean[keep], bn.running_var[keep], 48
        dw = block._depthwise_conv
        dw.weight, dw.in_channels, dw.out_channels, dw.groups = torch.nn.Parameter(dw.weight[keep]), 48, 48, 48
        block._project_conv.weight = torch.nn.Parameter(block._project_conv.weight[:, keep])
        block._project_conv.in_channels = 48
    save_checkpoint(model, tmp_path / "dw.pt", meta={})
    loaded, _ = load_checkpoint(tmp_path / "dw.pt", spec.build())
    assert loaded._blocks[1]._depthwise_conv.groups == 48
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(loaded(x), model.eval()(x))


def test_plain_state_dict_is_accepted(tmp_path: Path) -> None:
    model = tiny_resnet(seed=1)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded, meta = load_checkpoint(tmp_path / "sd.pt", tiny_resnet(seed=2))
    assert meta == {} and torch.equal(loaded(X), model(X))


def test_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "none.pt", tiny_resnet())
    save_checkpoint(tiny_resnet(), tmp_path / "ok.pt", meta={})
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"cut.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.pt", tiny_resnet())
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "text.pt", tiny_resnet())


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/edgeship-ckpt-pwned",))


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = Path("/tmp/edgeship-ckpt-pwned")
    marker.unlink(missing_ok=True)
    torch.save({"weights": _Evil()}, tmp_path / "evil.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused: the file is not plain weights"):
        load_checkpoint(tmp_path / "evil.pt", tiny_resnet())
    assert not marker.exists()


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    save_checkpoint(tiny_resnet(), tmp_path / "tiny.pt", meta={})
    with pytest.raises(CheckpointError, match=r"another architecture"):
        load_checkpoint(tmp_path / "tiny.pt", get_model_spec("fmnist_cnn").build())
    torch.save(tiny_resnet().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match=r"does not fit model FmnistCNN \(missing: .*unexpected: "):
        load_checkpoint(tmp_path / "sd.pt", get_model_spec("fmnist_cnn").build())


def test_zoo_names_and_suggestions() -> None:
    spec = get_model_spec("fmnist_cnn")
    assert spec.input_shape == (1, 28, 28) and len(spec.class_names) == 10
    with pytest.raises(UsageError, match=r"unknown model 'fmnist_cn'. Did you mean 'fmnist_cnn'\?"):
        get_model_spec("fmnist_cn")


def test_user_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mynets.py").write_text(
        "from tests.conftest import tiny_resnet\ndef make():\n    return tiny_resnet()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = user_model_spec("mynets:make", input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,), class_names=("a",))
    assert spec.build()(X).shape == (3, 10)
    with pytest.raises(UsageError, match="cannot import 'nonexistent_mod'"):
        load_factory("nonexistent_mod:make")
    with pytest.raises(UsageError, match="has no callable 'nope'"):
        load_factory("mynets:nope")
    with pytest.raises(UsageError, match=r"expected package\.module:factory"):
        load_factory("mynets")
    sys.modules.pop("mynets", None)


def test_efficientnet_lite0_real_weights() -> None:
    spec = get_model_spec("efficientnet_lite0")
    model = spec.build()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (1, 1000) and torch.equal(out, model(x))
    # ImageNet weights are not random: BN statistics of the stem are trained values
    assert model._bn0.running_var.mean() > 0.5 and not torch.allclose(model._bn0.running_mean, torch.zeros(32))


@needs_fmnist
def test_committed_default_checkpoint_measures_what_its_figures_say() -> None:
    """models/fmnist_cnn.pt measured here on all 10,000 Fashion-MNIST test images: the accuracy its committed
    figures (models/fmnist_cnn.json, the checkpoint's own meta) record, and not below 0.88."""
    from pipeline.data.fashion_mnist import load_fashion_mnist
    from pipeline.train.distill import accuracy, predict

    figures = json.loads((REPO / "models" / "fmnist_cnn.json").read_text())
    spec = get_model_spec("fmnist_cnn")
    model, meta = load_checkpoint(REPO / "models" / "fmnist_cnn.pt", spec.build())
    assert meta["test_accuracy"] == figures["test_accuracy"] and meta["test_images"] == figures["test_images"]
    test = load_fashion_mnist("test")
    assert len(test) == figures["test_images"] == 10_000
    acc = accuracy(predict(model, spec, test), test.labels)
    assert acc >= 0.88
    assert abs(acc - figures["test_accuracy"]) <= 0.002, acc  # 20 images: float noise across CPUs, no more
    assert (REPO / "models" / "fmnist_cnn.pt").stat().st_size < 1_500_000
