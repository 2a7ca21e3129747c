"""The CPU fast paths (passl/utils/cpu_fast.py) compute what the plain code computes, values and
gradients, take the plain path where they do not apply, and are only on where a CPU run asked for them.

Tolerances: float32 results of the same products summed in another order (addmm vs matmul + add,
ones @ grad vs a reduction, batch_norm vs subtract and divide): rtol 1e-5 / atol 1e-6 per layer,
rtol 1e-4 / atol 1e-6 through a whole model step."""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from passl.data.transforms import Normalize
from passl.utils import cpu_fast


@pytest.fixture
def fast_paths():
    """Yields a function that switches the fast paths on (True) or off (False); restores the state after."""
    before = cpu_fast.enabled_fast_paths()

    def switch(on):
        if on:
            cpu_fast.enable_cpu_fast_paths()
        else:
            cpu_fast.disable_cpu_fast_paths()
    yield switch
    cpu_fast.disable_cpu_fast_paths()
    if before:
        cpu_fast.enable_cpu_fast_paths()


def linear_grads(layer, x):
    x = paddle.to_tensor(x, stop_gradient=False)
    y = layer(x)
    (y * y).sum().backward()           # a non-constant upstream gradient
    out = [y.numpy(), x.grad.numpy()] + [p.grad.numpy() for p in layer.parameters()]
    layer.clear_gradients(set_to_zero=False)
    return out


def on_and_off(fast_paths, fn):
    """(fn() with the fast paths on, fn() with them off)."""
    fast_paths(True)
    fast = fn()
    fast_paths(False)
    return fast, fn()


@pytest.mark.parametrize("shape", [[3, 8], [2, 4, 8]])
def test_linear_same_values_and_gradients(fast_paths, shape):
    layer = paddle.nn.Linear(8, 5)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    calls = []
    original = cpu_fast._AddmmLinear.apply
    cpu_fast._AddmmLinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        fast, plain = on_and_off(fast_paths, lambda: linear_grads(layer, x))
    finally:
        cpu_fast._AddmmLinear.apply = original
    assert calls == [1]                # the fast path ran once (on), the plain one once (off)
    for got, want in zip(fast, plain):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_linear_frozen_parameters_get_no_gradient(fast_paths):
    fast_paths(True)
    layer = paddle.nn.Linear(8, 5)
    for p in layer.parameters():
        p.stop_gradient = True
    x = paddle.randn([3, 8])
    x.stop_gradient = False
    layer(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in layer.parameters())


def test_linear_input_without_gradient_still_trains_the_layer(fast_paths):
    fast_paths(True)
    layer = paddle.nn.Linear(8, 5)
    layer(paddle.randn([3, 8])).sum().backward()
    np.testing.assert_allclose(layer.bias.grad.numpy(), np.full(5, 3.0, np.float32))


def test_linear_other_dtypes_and_no_bias_take_the_plain_path(fast_paths):
    fast_paths(True)
    assert not cpu_fast._eager_float32_cpu(paddle.randn([2, 8]).astype("float64"))
    layer = paddle.nn.Linear(8, 5, bias_attr=False)
    x = np.random.default_rng(1).normal(size=[3, 8]).astype(np.float32)
    fast, plain = on_and_off(fast_paths, lambda: linear_grads(layer, x))
    for got, want in zip(fast, plain):
        np.testing.assert_array_equal(got, want)


def test_normalize_batch_same_values(fast_paths):
    pixels = paddle.to_tensor(np.random.default_rng(2).integers(0, 256, (2, 3, 20, 30), dtype=np.uint8))
    normalize = Normalize(mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4])
    fast, plain = on_and_off(fast_paths, lambda: normalize.normalize_batch(pixels).numpy())
    assert fast.dtype == plain.dtype == np.float32
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


def test_a_training_step_has_the_same_loss_and_gradients(fast_paths):
    import passl
    from passl.models.lvvit import LVViT
    paddle.seed(0)
    model = LVViT(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=7, drop_path_rate=0.1)
    model.train()
    loss_fn = passl.build_loss({"name": "TokenLabelCrossEntropy"})
    x = paddle.to_tensor(np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32))
    batch = {"label": paddle.to_tensor([1, 2, 3, 4])}

    def step():
        paddle.seed(5)                  # the same MixToken box and drop-path draws
        loss = loss_fn(model(x), batch)["loss"]
        loss.backward()
        grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters() if p.grad is not None}
        model.clear_gradients(set_to_zero=False)
        return float(loss), grads
    (fast_loss, fast_grads), (plain_loss, plain_grads) = on_and_off(fast_paths, step)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) > 20
    for name in plain_grads:
        np.testing.assert_allclose(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_switch_puts_the_plain_code_back(fast_paths):
    fast_paths(False)
    plain_linear, plain_normalize = paddle.nn.Linear.forward, Normalize.normalize_batch
    assert plain_linear is cpu_fast._PLAIN_LINEAR_FORWARD and cpu_fast.enabled_fast_paths() == []
    assert cpu_fast.enable_cpu_fast_paths() == ["linear_addmm", "normalize_batch_norm"]
    assert cpu_fast.enable_cpu_fast_paths() == []          # idempotent
    assert paddle.nn.Linear.forward is not plain_linear and Normalize.normalize_batch is not plain_normalize
    assert cpu_fast.disable_cpu_fast_paths() == ["linear_addmm", "normalize_batch_norm"]
    assert paddle.nn.Linear.forward is plain_linear and Normalize.normalize_batch is plain_normalize


def test_cpu_runtime_switches_them_on_unless_told_not_to(fast_paths):
    from passl.utils.cpu_threads import STRIDE_FLAG, configure_cpu_runtime
    keep = {STRIDE_FLAG: "0", "MALLOC_TOP_PAD_": "0"}      # leave the other runtime settings alone
    fast_paths(False)
    assert configure_cpu_runtime({**keep, cpu_fast.SWITCH_ENV: "0"}) == []
    assert cpu_fast.enabled_fast_paths() == []
    assert configure_cpu_runtime(dict(keep)) == ["linear_addmm", "normalize_batch_norm"]


PLAIN_PROBE = """
import sys
sys.path.insert(0, {root!r})
from passl.utils.runtime import configure_process
configure_process()
import numpy as np, paddle
import passl
from passl.utils import cpu_fast
def refuse(*args):
    raise AssertionError("a fast path ran")
cpu_fast._AddmmLinear.apply = refuse
model = passl.build_model({{"name": "LVViT", "img_size": 32, "embed_dim": 16, "depth": 1, "num_heads": 2,
                            "num_classes": 3, "stem": "patch16"}})
model.train()
passl.build_loss({{"name": "TokenLabelCrossEntropy"}})(model(paddle.rand([2, 3, 32, 32])),
                                                      {{"label": paddle.to_tensor([0, 1])}})["loss"].backward()
assert cpu_fast.enabled_fast_paths() == [] and paddle.nn.Linear.forward is cpu_fast._PLAIN_LINEAR_FORWARD
from passl.utils.distributed import select_device
select_device("cpu", log=None)
print(",".join(cpu_fast.enabled_fast_paths()))
"""


def test_a_process_runs_the_plain_code_until_a_cpu_run_selects_its_device(repo_root):
    env = {k: v for k, v in os.environ.items() if k != cpu_fast.SWITCH_ENV}
    proc = subprocess.run([sys.executable, "-c", PLAIN_PROBE.format(root=repo_root)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "linear_addmm,normalize_batch_norm"
