"""Layers with hand-written backward passes for the hot spots of a CPU training step.

Paddle's CPU build runs most elementwise and reduction kernels on one thread. A Linear's bias is a
separate broadcast add forward and a reduction backward, and together these cost as much as the
matrix product itself (benchmarks/bench_train.py --profile). The layers here compute the same
function with the same parameters as their plain Paddle counterparts:
- the bias goes into an ``addmm``;
- its gradient is a matrix-vector product, which the math library runs on every core.

They take the plain path wherever the fast one does not apply: GPU, autocast, static graphs
(export), and dtypes other than float32.
"""
import paddle
import paddle.nn as nn
from paddle.autograd import PyLayer

__all__ = ["cpu_fast_path", "Linear"]


def cpu_fast_path(x):
    """True for an eager float32 CPU tensor outside autocast."""
    return (paddle.in_dynamic_mode() and x.dtype == paddle.float32 and x.place.is_cpu_place()
            and not paddle.amp.is_autocast_enabled())


def _column_sums(rows):
    """rows [M, N] -> [N] as ones[1, M] @ rows: a threaded matrix-vector product, not a 1-thread reduce."""
    return paddle.matmul(paddle.ones([1, rows.shape[0]], rows.dtype), rows).reshape([-1])


class _AddmmLinear(PyLayer):
    """y = x @ W + b for x [..., in], W [in, out], b [out]."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.needs = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient)
        n_in, n_out = weight.shape
        out = paddle.addmm(bias, x.reshape([-1, n_in]), weight)
        return out.reshape(list(x.shape[:-1]) + [n_out])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        need_x, need_w, need_b = ctx.needs
        n_in, n_out = weight.shape
        rows = grad.reshape([-1, n_out])
        dx = paddle.matmul(grad, weight, transpose_y=True) if need_x else None
        dw = paddle.matmul(x.reshape([-1, n_in]), rows, transpose_x=True) if need_w else None
        db = _column_sums(rows) if need_b else None
        return dx, dw, db


class Linear(nn.Linear):
    """``paddle.nn.Linear`` (same parameters, same state-dict keys) with the CPU fast path above."""

    def forward(self, x):
        if self.bias is None or not cpu_fast_path(x):
            return super().forward(x)
        return _AddmmLinear.apply(x, self.weight, self.bias)
