"""LV-ViT with Token Labeling on PaddlePaddle.

Importing passl changes nothing in the process and does not import paddle: an entry point first
calls ``passl.utils.runtime.configure_process()``. The registries below fill themselves on first use
(passl/registry.py), and ``passl.models``, ``passl.data``, ... are imported when first named.
"""
import importlib

from passl.registry import (DATASETS, LABEL_STORES, LOSSES, LR_SCHEDULES, MODELS,  # noqa: F401
                            OPTIMIZERS, TRANSFORMS)

__version__ = "0.1.0"


def __getattr__(name):
    """``passl.models`` and the other submodules, imported on first use."""
    if name.startswith("__"):
        raise AttributeError(f"module 'passl' has no attribute {name!r}")
    try:
        return importlib.import_module(f"passl.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"passl.{name}":
            raise   # the submodule exists but something it imports does not
        raise AttributeError(f"module 'passl' has no attribute {name!r}") from None


def build_model(cfg, **extra):
    """Build a model from a ``{name: lvvit_s, img_size: 384, ...}`` dict (a YAML ``model:`` section).
    ``sync_bn`` is how the trainer runs the model, not an argument of it (passl.config), and is dropped."""
    return MODELS.build({k: v for k, v in cfg.items() if k != "sync_bn"}, **extra)


def build_loss(cfg, **extra):
    """Build a loss from a ``{name: TokenLabelCrossEntropy, ...}`` dict (a YAML ``loss:`` section)."""
    return LOSSES.build(cfg, **extra)
