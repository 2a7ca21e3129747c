"""Optimizer and learning-rate schedules.

Parameter groups: no weight decay on 1-D parameters (norm scales, biases) and on what the model's
``no_weight_decay()`` names. The configured lr is for ``reference_batch`` images per optimizer step
and is scaled linearly to the actual global batch. Schedules are pure functions of training
progress in epochs (``epoch_progress``: finished epochs + the fraction of the current one done), so
resuming needs no scheduler state, and a run resumed with another number of processes or another
batch size (so other steps per epoch) continues the same curve.
"""
import functools
import math

import paddle

from passl.errors import ConfigError
from passl.ranges import NonNegativeFloat, PositiveFloat, ranged
from passl.registry import LR_SCHEDULES, OPTIMIZERS

__all__ = ["split_decay_groups", "scale_lr", "build_optimizer", "AdamW", "WarmupCosine", "Constant",
           "build_lr_schedule", "epoch_progress"]


def split_decay_groups(model, no_weight_decay=None):
    """Split the trainable parameters of ``model`` into two lists of structured names.

    Returns ``(decay, no_decay)``: ``no_decay`` holds every 1-D parameter (LayerNorm/BN scales and
    every bias), every name ending in ``bias``, and the names in ``no_weight_decay`` (default: the
    model's own ``no_weight_decay()`` if it has one), matched exactly or as a ``name.`` prefix.
    """
    if no_weight_decay is None:
        no_weight_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    skip = set(no_weight_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        named = name in skip or any(name.startswith(s + ".") for s in skip)
        if param.ndim <= 1 or name.endswith("bias") or named:
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def scale_lr(lr, reference_batch, global_batch):
    """``lr`` was tuned for ``reference_batch`` images per step; scale it to ``global_batch``.

    ``reference_batch`` 0 means no scaling.
    """
    if reference_batch == 0:
        return lr
    if reference_batch < 0 or global_batch <= 0:
        raise ConfigError(f"optimizer.reference_batch must be >= 0 (got {reference_batch}) and the "
                          f"global batch positive (got {global_batch})")
    return lr * global_batch / reference_batch


@OPTIMIZERS.register()
def AdamW(lr: PositiveFloat = 1.6e-3, reference_batch: ranged(int, 0, note="0: the lr is used as it is") = 1024,
          beta1: ranged(float, 0, 1, high_open=True) = 0.9, beta2: ranged(float, 0, 1, high_open=True) = 0.999,
          epsilon: PositiveFloat = 1e-8, weight_decay: NonNegativeFloat = 0.05):
    """Paddle AdamW with decoupled weight decay; every argument is a config key.

    ``lr`` is for ``reference_batch`` images per optimizer step (``build_optimizer`` passes the lr
    already scaled to the global batch); ``reference_batch`` 0 means no scaling. Returns
    ``make(parameters, apply_decay_param_fun, grad_clip, multi_precision) -> paddle.optimizer.AdamW``:
    what the optimizer works on, which parameters decay, clipping (``train.grad_clip``) and float32
    master weights (``amp.level: O2``) are the trainer's to give, not config keys.
    """
    return functools.partial(paddle.optimizer.AdamW, learning_rate=lr, beta1=beta1, beta2=beta2, epsilon=epsilon,
                             weight_decay=weight_decay)


def build_optimizer(opt_cfg, model, global_batch, grad_clip=None, multi_precision=False, log=print):
    """Build the ``optimizer:`` section for ``model``; returns ``(optimizer, base_lr)``.

    ``base_lr`` is the configured lr scaled from ``reference_batch`` to ``global_batch`` (images per
    optimizer step over all processes, accumulation included). ``grad_clip`` is a max global norm.
    """
    decay, no_decay = split_decay_groups(model)
    by_name = dict(model.named_parameters())
    decay_ids = {by_name[n].name for n in decay}  # Paddle asks by the parameter's internal name
    cfg = dict(opt_cfg)
    base_lr = scale_lr(cfg.get("lr", 1.6e-3), cfg.get("reference_batch", 1024), global_batch)
    if log:
        log(f"lr {cfg.get('lr', 1.6e-3):.4g} for a batch of {cfg.get('reference_batch', 1024)} -> "
            f"{base_lr:.4g} for the global batch of {global_batch}; weight decay on {len(decay)} tensors, "
            f"none on {len(no_decay)}")
    cfg["lr"] = base_lr
    make = OPTIMIZERS.build(cfg)
    optimizer = make(parameters=[by_name[n] for n in decay + no_decay],
                     apply_decay_param_fun=lambda n: n in decay_ids,
                     grad_clip=paddle.nn.ClipGradByGlobalNorm(grad_clip) if grad_clip else None,
                     multi_precision=multi_precision)
    return optimizer, base_lr


# ---------------------------------------------------------------------------------------------
# schedules: callables epoch progress -> lr, built with base_lr and epochs

def epoch_progress(epoch, step_in_epoch, steps_per_epoch):
    """Training progress in epochs: ``epoch`` finished epochs plus ``step_in_epoch`` of the current
    epoch's ``steps_per_epoch`` optimizer steps done. The lr of optimizer step k (0-based) of epoch e
    is ``schedule(epoch_progress(e, k, steps_per_epoch))``."""
    return epoch + step_in_epoch / steps_per_epoch


class _Schedule:
    """A linear warm-up from ``warmup_lr`` over ``warmup_epochs``, then ``after_warmup(t)``.

    Time ``t`` is training progress in epochs (``epoch_progress``): used as it is when
    ``per_iteration``, rounded down to whole epochs otherwise (as the reference, which updates once
    per epoch).
    """

    def __init__(self, warmup_epochs, warmup_lr, per_iteration):
        self.warmup_epochs, self.warmup_lr, self.per_iteration = warmup_epochs, warmup_lr, per_iteration
        self.base_lr = self.epochs = None

    def bind(self, base_lr, epochs):
        """Attach the run's scaled lr and total epochs."""
        self.base_lr, self.epochs = base_lr, epochs
        return self

    def __call__(self, t):
        """The lr at training progress ``t`` epochs (see ``epoch_progress``)."""
        t = t if self.per_iteration else math.floor(t)
        if t < self.warmup_epochs:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * t / self.warmup_epochs
        return self.after_warmup(t)

    def after_warmup(self, t):
        raise NotImplementedError


@LR_SCHEDULES.register()
class WarmupCosine(_Schedule):
    """Linear warm-up from ``warmup_lr``, cosine to ``min_lr``, then ``cooldown_epochs`` at ``min_lr``.

    ``epochs`` counts the cool-down, so the cosine ends at ``epochs - cooldown_epochs``. As in timm,
    the cosine runs from epoch 0 and warm-up overrides its start, unless ``warmup_prefix`` makes the
    cosine begin where the warm-up ends. ``per_iteration`` False steps the lr once per epoch.
    """

    def __init__(self, warmup_epochs: NonNegativeFloat = 5.0, warmup_lr: NonNegativeFloat = 1e-6,
                 min_lr: NonNegativeFloat = 1e-5, cooldown_epochs: NonNegativeFloat = 10.0, per_iteration: bool = True,
                 warmup_prefix: bool = False):
        super().__init__(warmup_epochs, warmup_lr, per_iteration)
        self.min_lr, self.cooldown_epochs, self.warmup_prefix = min_lr, cooldown_epochs, warmup_prefix

    def after_warmup(self, t):
        start = self.warmup_epochs if self.warmup_prefix else 0.0
        span = self.epochs - self.cooldown_epochs - start
        if span <= 0 or t >= start + span:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * (t - start) / span))


@LR_SCHEDULES.register()
class Constant(_Schedule):
    """The base lr throughout, after an optional linear warm-up from ``warmup_lr`` (fine-tuning)."""

    def __init__(self, warmup_epochs: NonNegativeFloat = 0.0, warmup_lr: NonNegativeFloat = 1e-6,
                 per_iteration: bool = True):
        super().__init__(warmup_epochs, warmup_lr, per_iteration)

    def after_warmup(self, t):
        return self.base_lr


def build_lr_schedule(sched_cfg, base_lr, epochs):
    """Build the ``lr_schedule:`` section; returns a callable ``epoch progress -> lr``."""
    return LR_SCHEDULES.build(sched_cfg).bind(base_lr, epochs)
