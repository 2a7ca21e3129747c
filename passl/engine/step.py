"""The optimizer step: loss scaling, backward, gradient accumulation, clipping and the update.

    step = OptimizerStep(optimizer, scaler, accum_steps)
    with step.accumulating(model, update):       # DataParallel all-reduces only when updating
        loss = loss_fn(model(images), batch)["loss"]
        step.backward(loss)                       # loss / accum_steps, times the loss scale
    if update:                                    # the last of accum_steps micro-batches
        step.step(lr)                             # unscale, clip, update, adjust the scale, zero grads

Gradients are clipped inside ``optimizer.step()`` by the optimizer's ``grad_clip``
(``paddle.nn.ClipGradByGlobalNorm``, see optim.build_optimizer); ``GradScaler.step`` unscales them
first, so the clip sees true gradients, and skips the update when they are not finite; ``skipped``
then holds that flag (on the device) for the caller to count.
"""
import contextlib

import paddle
from paddle.base import unique_name

__all__ = ["OptimizerStep", "NormStatistics", "found_inf"]


class OptimizerStep:
    """Backward and update for one optimizer and an optional ``paddle.amp.GradScaler``.

    ``accum_steps`` micro-batches make one optimizer step; each backward adds
    ``loss / accum_steps`` to the gradients, so the step sees the mean over the micro-batches.
    """

    def __init__(self, optimizer, scaler=None, accum_steps=1):
        self.optimizer, self.scaler, self.accum_steps = optimizer, scaler, accum_steps
        # Paddle names optimizer state "<param>_moment1_<n>" with a process-wide counter n; a private
        # name generator keeps n = 0, so a checkpoint restores into any process
        self._names = unique_name.UniqueNameGenerator()
        self.skipped = None     # after a scaled step: bool tensor [1] on the device, True if it was skipped
        self.norm_statistics = None   # a NormStatistics when skipped steps must not touch BN statistics

    def accumulating(self, model, update):
        """Context for the forward and backward of one micro-batch: a DataParallel ``model`` skips the
        gradient all-reduce unless ``update`` (the micro-batch that ends the step)."""
        if update or not isinstance(model, paddle.DataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def backward(self, loss):
        """Add the gradients of ``loss`` (a 0-d tensor: this micro-batch's mean loss)."""
        if self.accum_steps > 1:
            loss = loss / self.accum_steps
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self, lr):
        """Update the weights with learning rate ``lr`` and zero the gradients."""
        self.optimizer.set_lr(lr)
        with unique_name.guard(self._names):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.skipped = found_inf(self.scaler)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.clear_grad()


def found_inf(scaler):
    """Whether ``scaler`` (a ``paddle.amp.GradScaler``) skipped the step it just took, as the bool tensor
    [1] it keeps on the device, or None where it keeps none (a disabled scaler). Paddle 3.3.1 has no
    public accessor: ``GradScaler._unscale`` sets ``_found_inf`` from the gradients
    (paddle/amp/grad_scaler.py:424-456) and ``step`` hands that tensor to the optimizer, which then skips
    the update (grad_scaler.py:843-850, optimizer.py:1354-1364)."""
    return getattr(scaler, "_found_inf", None)


class NormStatistics:
    """The running statistics of ``model``'s batch-norm layers, put back after a forward whose loss is not
    finite. Under a loss scaler such a step is skipped and the run goes on (guards.RunFlags), but the
    forward has already folded its NaN/inf activations into the running mean and variance, which would
    spoil evaluation and the EMA for good. Device ops only: a copy before the forward, a select after
    (the statistics are small: the convolutional stem's channels)."""

    def __init__(self, model):
        from passl.utils.distributed import batch_norm_layers
        self.tensors = [t for layer in batch_norm_layers(model).values() for t in (layer._mean, layer._variance)]

    def save(self):
        return [t.clone() for t in self.tensors]

    def keep_if_finite(self, saved, loss):
        """Put ``saved`` (from ``save``) back unless ``loss`` (0-d) is finite."""
        if not self.tensors:
            return
        finite = paddle.isfinite(loss.detach().astype("float32")).reshape([])
        with paddle.no_grad():
            for tensor, before in zip(self.tensors, saved):
                tensor.set_value(paddle.where(finite, tensor, before))
