"""Exponential moving average of a model's weights, kept in float32 whatever the model's dtype."""
import copy

import numpy as np
import paddle

from passl.utils.distributed import unwrap

__all__ = ["ModelEma"]


class ModelEma:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    Every floating-point entry of the state dict (parameters and BN running statistics) is
    averaged; integer buffers are copied. ``self.module`` is an eval-mode float32 copy of the model
    that holds the averages, so it can be evaluated and saved like the model itself. Its averaged
    tensors are views of one flat float32 buffer, so an update is one concatenation of the weights
    and one in-place ``lerp_`` on the device, whatever the number of tensors (a loop over the state
    dict launched two kernels and a copy per tensor: about 600 for lvvit_s; benchmarks/bench_ema.py).
    Under AMP O2 the weights averaged are the optimizer's float32 master weights, not the
    float16/bfloat16 parameters.
    """

    def __init__(self, model, decay=0.99992):
        """Copy ``model`` while it is still float32 (before AMP O2 casts it)."""
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap(model))
        self.module.eval()
        for p in self.module.parameters():
            p.stop_gradient = True
        targets = self.module.state_dict()
        self._averaged = [k for k, v in targets.items() if paddle.is_floating_point(v)]
        self._copied = [k for k, v in targets.items() if not paddle.is_floating_point(v)]
        half = [k for k in self._averaged if targets[k].dtype != paddle.float32]
        if half:
            raise ValueError(f"ModelEma needs the float32 model (before AMP O2 casts it); {half[0]} is "
                             f"{targets[half[0]].dtype}")
        self._share_flat_buffer()

    def _share_flat_buffer(self):
        """One float32 buffer holding the module's averaged tensors, which become views of it, the way
        Paddle's fused parameter buffers share memory (paddle/distributed/fleet/utils/
        tensor_fusion_helper.py:289-304: ``_slice(...)._share_buffer_to(param)``, then its dims)."""
        targets = self.module.state_dict()
        self._flat = self._flatten(targets)
        start = 0
        for key in self._averaged:
            tensor = targets[key]
            shape, size = list(tensor.shape), int(np.prod(tensor.shape))
            self._flat._slice(start, start + size)._share_buffer_to(tensor)
            tensor.get_tensor()._set_dims(shape)
            start += size

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
        # lerp: ema + (1 - decay) * (weights - ema), in float32, in place: the module's tensors follow
        self._flat.lerp_(current, 1.0 - self.decay)
        if self._copied:
            targets = self.module.state_dict()
            for key in self._copied:
                targets[key].set_value(source[key])

    def state_dict(self):
        """The averaged weights: {structured name: float32 tensor}."""
        return self.module.state_dict()

    def set_state_dict(self, state):
        """Copy ``state`` (a state dict of this model, float32 or half precision) into the averages;
        returns (missing, unexpected)."""
        targets = self.module.state_dict()
        state = {k: v.astype(targets[k].dtype) if k in targets and isinstance(v, paddle.Tensor)
                 and paddle.is_floating_point(v) and v.dtype != targets[k].dtype else v for k, v in state.items()}
        result = self.module.set_state_dict(state)
        self._share_flat_buffer()       # set_state_dict may have given the tensors new memory
        return result
