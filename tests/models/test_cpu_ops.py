"""cpu_ops.Linear: the same outputs and gradients as paddle.nn.Linear on the fast path and off it."""
import numpy as np
import paddle
import pytest

from passl.models.cpu_ops import Linear, cpu_fast_path
from passl.models.lvvit import reverse_batch


def pair(in_features=8, out_features=5, bias=True):
    fast = Linear(in_features, out_features, bias_attr=None if bias else False)
    plain = paddle.nn.Linear(in_features, out_features, bias_attr=None if bias else False)
    plain.set_state_dict(fast.state_dict())
    return fast, plain


def grads(layer, x):
    x = paddle.to_tensor(x, stop_gradient=False)
    y = layer(x)
    (y * y).sum().backward()           # a non-constant upstream gradient
    out = [y.numpy(), x.grad.numpy()] + [p.grad.numpy() for p in layer.parameters()]
    layer.clear_gradients(set_to_zero=False)
    return out


@pytest.mark.parametrize("shape", [[3, 8], [2, 4, 8]])
def test_fast_path_matches_plain_linear(shape):
    fast, plain = pair()
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    assert cpu_fast_path(paddle.to_tensor(x))
    for got, want in zip(grads(fast, x), grads(plain, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_get_no_gradient():
    fast, _ = pair()
    for p in fast.parameters():
        p.stop_gradient = True
    x = paddle.randn([3, 8])
    x.stop_gradient = False
    fast(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in fast.parameters())


def test_input_without_gradient_still_trains_the_layer():
    fast, _ = pair()
    fast(paddle.randn([3, 8])).sum().backward()
    np.testing.assert_allclose(fast.bias.grad.numpy(), np.full(5, 3.0, np.float32))


def test_other_dtypes_and_no_bias_take_the_plain_path():
    assert not cpu_fast_path(paddle.randn([2, 8]).astype("float64"))
    fast, plain = pair(bias=False)
    x = np.random.default_rng(1).normal(size=[3, 8]).astype(np.float32)
    for got, want in zip(grads(fast, x), grads(plain, x)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_reverse_batch_and_its_gradient():
    x = paddle.arange(24, dtype="float32").reshape([4, 3, 2])
    x.stop_gradient = False
    y = reverse_batch(x)
    np.testing.assert_array_equal(y.numpy(), x.numpy()[::-1])
    (y * paddle.arange(4, dtype="float32").reshape([4, 1, 1])).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy()[:, 0, 0], [3, 2, 1, 0])
