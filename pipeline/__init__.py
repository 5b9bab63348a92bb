"""edgeship: prune, fine-tune, convert, verify, profile and ship a PyTorch model for an edge target.

The Python API (pipeline/api.py), for a notebook or a training script::

    import pipeline
    result = pipeline.deploy(model, "host", data={"train": train_set, "test": test_set},
                             input_shape=(1, 28, 28), mean=0.286, std=0.353)
    print(result.table())

`deploy`, `load_target`, `profile` and `ship` import torch and TensorFlow only when called: `import pipeline`
stays light. `pipeline.deploy` and `pipeline.ship` are also the names of subpackages; importing those (which
binds a subpackage on its parent) leaves the names to the functions, whose other attributes are the
subpackages' (`from pipeline.deploy import deploy` and `import pipeline.ship.copy` work as before).
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import types
from typing import Any

__version__ = "0.1.0"

from pipeline import api as _api  # light: its heavy imports are inside its functions
from pipeline.request import BudgetCheck, DeployResult, VariantFigures

logging.getLogger(__name__).addHandler(logging.NullHandler())  # a library: quiet unless the caller sets up logging


class _Entry:
    """An API function whose name is a subpackage's too: calling it runs the function, any other public
    attribute is the subpackage's (read, set and deleted there, so mock.patch and monkeypatch reach it)."""

    def __init__(self, func: Any, submodule: str) -> None:
        functools.update_wrapper(self, func)
        self._submodule = submodule

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(importlib.import_module(self._submodule), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(importlib.import_module(self._submodule), name, value)

    def __delattr__(self, name: str) -> None:
        if name.startswith("_"):
            object.__delattr__(self, name)
        else:
            delattr(importlib.import_module(self._submodule), name)

    def __repr__(self) -> str:
        return f"<edgeship API function pipeline.{self.__name__}>"


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and isinstance(self.__dict__.get(name), _Entry):
            return  # the import system binding pipeline.deploy / pipeline.ship: the name stays the function
        super().__setattr__(name, value)


deploy = _Entry(_api.deploy, "pipeline.deploy")
ship = _Entry(_api.ship, "pipeline.ship")
load_target = _api.load_target
profile = _api.profile
sys.modules[__name__].__class__ = _Package

__all__ = ["BudgetCheck", "DeployResult", "VariantFigures", "__version__", "deploy", "load_target", "profile", "ship"]
