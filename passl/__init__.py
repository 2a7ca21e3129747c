"""LV-ViT with Token Labeling on PaddlePaddle."""
from passl.utils.cpu_threads import configure_cpu_threads

configure_cpu_threads()  # must precede the first `import paddle`

from passl.utils.paddle_check import check_paddle  # noqa: E402

check_paddle()

from passl.registry import (DATASETS, LABEL_STORES, LOSSES, LR_SCHEDULES, MODELS,  # noqa: E402
                            OPTIMIZERS, TRANSFORMS)
from passl import models, losses, data, engine  # noqa: E402,F401  (fill the registries)
from passl import annotate  # noqa: E402,F401  (registers the cnn_classifier annotator model)

__version__ = "0.1.0"


def build_model(cfg, **extra):
    """Build a model from a ``{name: lvvit_s, img_size: 384, ...}`` dict (a YAML ``model:`` section)."""
    return MODELS.build(cfg, **extra)


def build_loss(cfg, **extra):
    return LOSSES.build(cfg, **extra)
