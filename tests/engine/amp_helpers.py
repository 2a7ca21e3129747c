"""A stand-in for ``paddle.amp.GradScaler``, which does nothing on the CPU (it warns and disables itself)."""
import paddle


class SkippingScaler:
    """Scales the loss, and in ``step`` unscales the gradients, finds non-finite ones on the device into
    ``_found_inf`` and hands that flag to the optimizer, which skips the update, as GradScaler does
    (paddle/amp/grad_scaler.py: _unscale sets _found_inf; step calls
    ``optimizer._set_auxiliary_var('found_inf', ...)`` before ``optimizer.step()``)."""

    def __init__(self, factor=8.0):
        self.factor, self.steps, self.updates = factor, 0, 0

    def scale(self, loss):
        return loss * self.factor

    def step(self, optimizer):
        found = paddle.zeros([1], dtype="bool")
        for p in optimizer._parameter_list:
            if p.grad is not None:
                p.grad.set_value(p.grad / self.factor)
                found = paddle.logical_or(found, paddle.logical_not(paddle.isfinite(p.grad).all()).reshape([1]))
        self._found_inf = found
        optimizer._set_auxiliary_var("found_inf", found)
        optimizer.step()
        self.steps += 1

    def update(self):
        self.updates += 1

    def state_dict(self):
        return {"scale": self.factor}

    def load_state_dict(self, state):
        self.factor = state["scale"]
