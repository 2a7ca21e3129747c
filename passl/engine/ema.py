"""Exponential moving average of a model's weights, kept in float32 whatever the model's dtype."""
import copy

import numpy as np
import paddle

from passl.utils.distributed import unwrap

__all__ = ["ModelEma"]


class ModelEma:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    Every floating-point entry of the state dict (parameters and BN running statistics) is
    averaged; integer buffers are copied. The averages live in one flat float32 buffer, so an update
    is one concatenation of the weights and one in-place ``lerp_`` on the device, whatever the number of
    tensors (a loop over the state dict launched two or three kernels per tensor: about 600 for
    lvvit_s). Under AMP O2 the weights averaged are the optimizer's float32 master weights, not the
    float16/bfloat16 parameters. ``self.module`` is an eval-mode float32 copy of the model that holds
    the averages (written back from the buffer when it is read), so it can be evaluated and saved
    like the model itself.
    """

    def __init__(self, model, decay=0.99992):
        """Copy ``model`` while it is still float32 (before AMP O2 casts it)."""
        self.decay = float(decay)
        self._module = copy.deepcopy(unwrap(model))
        self._module.eval()
        for p in self._module.parameters():
            p.stop_gradient = True
        targets = self._module.state_dict()
        self._averaged = [k for k, v in targets.items() if paddle.is_floating_point(v)]
        self._copied = [k for k, v in targets.items() if not paddle.is_floating_point(v)]
        self._shapes = [list(targets[k].shape) for k in self._averaged]
        self._sizes = [int(np.prod(s)) for s in self._shapes]
        self._flat = self._flatten(targets)
        self._written = True        # whether self._module holds the values of self._flat

    def _flatten(self, state, masters=None):
        """The float32 concatenation of ``state``'s averaged entries (a master weight in place of its
        half-precision parameter where ``masters``, {parameter name: tensor}, has one)."""
        parts = []
        for key in self._averaged:
            value = state[key]
            if masters:
                value = masters.get(value.name, value)
            if value.dtype != paddle.float32:
                value = value.astype("float32")
            parts.append(value.reshape([-1]))
        return paddle.concat(parts) if parts else paddle.zeros([0], dtype="float32")

    @paddle.no_grad()
    def update(self, model, optimizer=None):
        """Fold the current weights of ``model`` (possibly DataParallel-wrapped) into the average.
        ``optimizer``: the run's optimizer, whose float32 master weights (AMP O2 with
        ``master_weight=True``: ``optimizer._master_weights``, {parameter name: tensor}, filled by
        paddle/optimizer/optimizer.py ``_create_master_weight``) are averaged in place of the
        float16/bfloat16 parameters."""
        source = unwrap(model).state_dict()
        current = self._flatten(source, getattr(optimizer, "_master_weights", None))
        # lerp: ema + (1 - decay) * (weights - ema), in float32
        self._flat.lerp_(current, 1.0 - self.decay)        # in place: no third model-sized buffer
        if self._copied:
            targets = self._module.state_dict()
            for key in self._copied:
                targets[key].set_value(source[key])
        self._written = False

    @property
    def module(self):
        """The float32 model holding the averages (eval mode, no gradients)."""
        if not self._written:
            targets = self._module.state_dict()
            for key, shape, piece in zip(self._averaged, self._shapes, paddle.split(self._flat, self._sizes)):
                targets[key].set_value(piece.reshape(shape))
            self._written = True
        return self._module

    def state_dict(self):
        """The averaged weights: {structured name: float32 tensor}."""
        return self.module.state_dict()

    def set_state_dict(self, state):
        """Copy ``state`` (a state dict of this model, float32 or half precision) into the averages;
        returns (missing, unexpected)."""
        targets = self._module.state_dict()
        state = {k: v.astype(targets[k].dtype) if k in targets and isinstance(v, paddle.Tensor)
                 and paddle.is_floating_point(v) and v.dtype != targets[k].dtype else v for k, v in state.items()}
        result = self._module.set_state_dict(state)
        self._flat = self._flatten(self._module.state_dict())
        self._written = True
        return result
