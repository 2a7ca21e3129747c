"""CPU fast paths: the only place where the CPU runs other code than the GPU.

Model, loss and data code use plain Paddle ops (nn.Linear, x[::-1], (x - mean) / std, autograd);
that is what a GPU runs and what a process runs unless ``enable_cpu_fast_paths()`` was called.
A CPU run turns them on through ``passl.utils.cpu_threads.configure_cpu_runtime()`` (called by
``select_device`` once the device is known to be the CPU; PASSL_CPU_FAST_PATHS=0 keeps the plain
code). Each trick computes the same function as the code it replaces (tests/utils/test_cpu_fast.py
checks values and gradients) and falls back to it wherever it does not apply.

Measured with ``python benchmarks/bench_cpu_fast.py`` (lvvit_t, batch 16): Paddle 3.3.1 CPU build,
2-core Intel Xeon (family 6 model 207, AVX-512), OMP_NUM_THREADS=2, on a machine shared with other
jobs (load average 3). Plain and fast alternate in one process (4 rounds of 5 calls); median ms per
call, wall time / process CPU time (both threads):

    trick / shape                                   plain           fast
    Linear, forward + backward: the bias inside ``addmm`` and its gradient as ones @ grad, a threaded
    matrix-vector product (nn.Linear: a broadcast add, and a one-thread reduction in backward)
      qkv, fc1: 240 -> 720 on [16, 197]             24.3 / 48.5     23.1 / 46.1
      proj: 240 -> 240                               9.1 / 18.2      7.3 / 14.6
      fc2: 720 -> 240                               17.2 / 34.4     16.5 / 33.1
      aux_head: 240 -> 1000 on [16, 196]            60.9 / 121.7    24.4 / 48.3
      summed over lvvit_t's 50 Linear layers       ~960 / ~1920    ~865 / ~1730  (~2% of a step)
    Normalize.normalize_batch as an inference-mode batch_norm, one fused pass ((x - mean) / std:
    two broadcast passes, one thread)
      uint8 [16, 3, 224, 224]                       58.1 / 58.6      2.0 / 2.0    (~1% of a step)

The whole training step (model, loss, AdamW; row train_step) with the fast paths off / on, in three
runs: 6817 / 6385 ms wall (20 steps each, load 3), 5584 / 5674 (8 steps, load 3), 12961 / 12572
(8 steps, load 6): the gain is a few percent at most, the size of the machine's noise. Both are
kept: each is a few lines here, tested against the plain code, and no layer was measurably slower.
Reversing the batch with an ``index_select`` gather (once a trick here) is gone: ``x[::-1]`` costs
~4 ms more per step (row reverse_batch: 2.8 vs 1.5 ms for the stem output, 9.3 vs 6.3 ms for aux;
``paddle.flip``, the slow kernel, 13.2 and 40.3 ms), so the plain code uses it on every device.
The dense loss's written-out gradient is not a CPU trick: it is the loss's formulation everywhere
(passl/losses/token_label.py says why).
"""
import os

import paddle
import paddle.nn as nn
from paddle.autograd import PyLayer

__all__ = ["enable_cpu_fast_paths", "disable_cpu_fast_paths", "enabled_fast_paths", "fast_paths_wanted",
           "SWITCH_ENV"]

SWITCH_ENV = "PASSL_CPU_FAST_PATHS"   # "0": configure_cpu_runtime leaves the plain code in place


# ---------------------------------------------------------------------------------------------
# Linear

def _eager_float32_cpu(x):
    """True for an eager float32 CPU tensor outside autocast (static graphs, AMP and GPUs stay plain)."""
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


_PLAIN_LINEAR_FORWARD = nn.Linear.forward


def _fast_linear_forward(self, x):
    """nn.Linear.forward while the fast paths are on: same parameters, same result."""
    if self.bias is None or not _eager_float32_cpu(x):
        return _PLAIN_LINEAR_FORWARD(self, x)
    return _AddmmLinear.apply(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------
# Normalize

def _batch_norm_normalize_batch(self, images):
    """Normalize.normalize_batch while the fast paths are on: (x - 255 mean) / (255 std) per channel as
    an inference-mode batch_norm whose variance is stored less epsilon, so it divides by 255 std."""
    import paddle.nn.functional as F

    from passl.data.transforms import device_constant
    eps = 1e-5
    mean = device_constant([255.0 * m for m in self.mean], images.place)
    var = device_constant([(255.0 * s) ** 2 - eps for s in self.std], images.place)
    return F.batch_norm(images.astype("float32"), mean, var, training=False, epsilon=eps)


# ---------------------------------------------------------------------------------------------
# the switch

def _targets():
    """{name: (owner, attribute, fast function)} of every fast path."""
    from passl.data.transforms import Normalize
    return {"linear_addmm": (nn.Linear, "forward", _fast_linear_forward),
            "normalize_batch_norm": (Normalize, "normalize_batch", _batch_norm_normalize_batch)}


_plain = {}   # name -> the plain function, while that fast path is on


def enable_cpu_fast_paths():
    """Switch every fast path on for this process; returns the names switched on now (idempotent)."""
    switched = []
    for name, (owner, attribute, fast) in _targets().items():
        if name not in _plain:
            _plain[name] = owner.__dict__[attribute]
            setattr(owner, attribute, fast)
            switched.append(name)
    return switched


def disable_cpu_fast_paths():
    """Put the plain code back; returns the names switched off."""
    targets = _targets()
    switched = []
    for name in list(_plain):
        owner, attribute, _ = targets[name]
        setattr(owner, attribute, _plain.pop(name))
        switched.append(name)
    return switched


def enabled_fast_paths():
    """Names of the fast paths now on."""
    return sorted(_plain)


def fast_paths_wanted(environ=None):
    """False when the user set PASSL_CPU_FAST_PATHS=0."""
    return (os.environ if environ is None else environ).get(SWITCH_ENV, "1") != "0"
