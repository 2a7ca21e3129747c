"""Exponential moving average of a model's weights, kept in float32 whatever the model's dtype."""
import copy

import paddle

from passl.utils.distributed import unwrap

__all__ = ["ModelEma"]


class ModelEma:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    Every floating-point entry of the state dict (parameters and BN running statistics) is
    averaged; integer buffers are copied. ``self.module`` is an eval-mode float32 copy of the model
    that holds the averages, so it can be evaluated and saved like the model itself.
    """

    def __init__(self, model, decay=0.99992):
        """Copy ``model`` while it is still float32 (before AMP O2 casts it)."""
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap(model))
        self.module.eval()
        for p in self.module.parameters():
            p.stop_gradient = True
        self._targets = self.module.state_dict()

    @paddle.no_grad()
    def update(self, model):
        """Fold the current weights of ``model`` (possibly DataParallel-wrapped) into the average."""
        source = unwrap(model).state_dict()
        for key, ema_value in self._targets.items():
            value = source[key]
            if paddle.is_floating_point(ema_value):
                # lerp: ema + (1 - decay) * (value - ema), in float32
                ema_value.set_value(paddle.lerp(ema_value, value.astype("float32"), 1.0 - self.decay))
            else:
                ema_value.set_value(value)

    def state_dict(self):
        """The averaged weights: {structured name: float32 tensor}."""
        return self.module.state_dict()

    def set_state_dict(self, state):
        """Copy ``state`` (a state dict of this model) into the averages; returns (missing, unexpected)."""
        return self.module.set_state_dict(state)
