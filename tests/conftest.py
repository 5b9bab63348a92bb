"""Shared fixtures: tiny seeded models and the skip rules for capabilities a machine may lack."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from tests.tiny_models import FMNIST_DIR, TinyResNet, tiny_resnet

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# device latency tables are cached per user (pipeline/latency/cache.py): the tests keep theirs to themselves
os.environ.setdefault("EDGESHIP_CACHE", tempfile.mkdtemp(prefix="edgeship-test-cache-"))
torch.set_num_threads(2)


@pytest.fixture
def tiny_model() -> TinyResNet:
    return tiny_resnet()


def has_fashion_mnist() -> bool:
    return (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()


needs_fmnist = pytest.mark.skipif(
    not has_fashion_mnist(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist"
)
