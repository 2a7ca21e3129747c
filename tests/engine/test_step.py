"""OptimizerStep: accumulation averages micro-batches, the lr is set, the loss scaler is used in
order, DataParallel syncs only on the updating micro-batch, optimizer state names do not depend
on how many optimizers the process made before."""
import warnings

import numpy as np
import paddle
import pytest

from passl.engine.step import OptimizerStep


def _linear(seed=0):
    paddle.seed(seed)
    return paddle.nn.Linear(3, 2)


def _loss(model, x):
    return model(x).pow(2).mean()


def test_accumulated_gradients_are_the_mean_over_micro_batches():
    x1, x2 = paddle.to_tensor(np.arange(6, dtype="float32").reshape(2, 3)), paddle.ones([2, 3])
    model = _linear()
    step = OptimizerStep(paddle.optimizer.SGD(learning_rate=1.0, parameters=model.parameters()), accum_steps=2)
    step.backward(_loss(model, x1))
    step.backward(_loss(model, x2))
    reference = _linear()
    ((_loss(reference, x1) + _loss(reference, x2)) / 2).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-6)


def test_step_uses_the_given_lr_and_clears_gradients():
    model = _linear()
    before = model.weight.numpy().copy()
    step = OptimizerStep(paddle.optimizer.SGD(learning_rate=1.0, parameters=model.parameters()))
    step.backward(_loss(model, paddle.ones([2, 3])))
    grad = model.weight.grad.numpy().copy()
    step.step(0.25)
    assert step.optimizer.get_lr() == 0.25
    np.testing.assert_allclose(model.weight.numpy(), before - 0.25 * grad, rtol=1e-6)
    assert model.weight.grad is None or not model.weight.grad.numpy().any()


class RecordingScaler:
    """Stands in for paddle.amp.GradScaler (which does nothing on the CPU): records the calls."""

    def __init__(self, factor):
        self.factor, self.calls = factor, []

    def scale(self, loss):
        self.calls.append(("scale", float(loss)))
        return loss * self.factor

    def step(self, optimizer):
        self.calls.append(("step", optimizer))
        for p in optimizer._parameter_list:       # unscale, as GradScaler does before the update
            p.grad.set_value(p.grad / self.factor)
        optimizer.step()

    def update(self):
        self.calls.append(("update",))


def test_the_scaler_scales_the_accumulated_loss_then_steps_and_updates():
    model = _linear()
    optimizer = paddle.optimizer.SGD(learning_rate=1.0, parameters=model.parameters())
    scaler = RecordingScaler(8.0)
    step = OptimizerStep(optimizer, scaler, accum_steps=2)
    loss = _loss(model, paddle.ones([2, 3]))
    step.backward(loss)
    assert scaler.calls == [("scale", float(loss) / 2)]
    before = model.weight.numpy().copy()
    reference = _linear()
    (_loss(reference, paddle.ones([2, 3])) / 2).backward()
    step.step(0.5)
    assert [c[0] for c in scaler.calls] == ["scale", "step", "update"] and scaler.calls[1][1] is optimizer
    np.testing.assert_allclose(model.weight.numpy(), before - 0.5 * reference.weight.grad.numpy(), rtol=1e-5)


def test_optimizer_state_names_do_not_depend_on_earlier_optimizers():
    model = _linear()
    for _ in range(3):     # each optimizer that steps outside the guard advances Paddle's global counter
        other = paddle.optimizer.AdamW(parameters=model.parameters())
        _loss(model, paddle.ones([1, 3])).backward()
        other.step()
        other.clear_grad()
    step = OptimizerStep(paddle.optimizer.AdamW(parameters=model.parameters()))
    step.backward(_loss(model, paddle.ones([1, 3])))
    step.step(1e-3)
    moments = [k for k in step.optimizer.state_dict() if "moment1" in k]
    assert moments and all(k.endswith("_moment1_0") for k in moments), moments


def test_data_parallel_skips_the_gradient_sync_until_the_update():
    model = _linear()
    assert OptimizerStep(None).accumulating(model, update=False).__enter__() is None   # a plain model: no-op
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = paddle.DataParallel(model)
    step = OptimizerStep(None, accum_steps=2)
    with step.accumulating(wrapped, update=False):
        assert wrapped.grad_need_sync is False
    with step.accumulating(wrapped, update=True):
        assert wrapped.grad_need_sync is True


def test_a_step_the_scaler_skips_leaves_the_weights_and_says_so_on_the_device():
    from amp_helpers import SkippingScaler
    model = _linear()
    step = OptimizerStep(paddle.optimizer.AdamW(learning_rate=0.1, parameters=model.parameters()), SkippingScaler())
    assert step.skipped is None
    before = model.weight.numpy().copy()
    step.backward(_loss(model, paddle.ones([2, 3])) * float("nan"))
    step.step(0.1)
    assert isinstance(step.skipped, paddle.Tensor) and step.skipped.numpy().tolist() == [True]
    np.testing.assert_array_equal(model.weight.numpy(), before)
    step.backward(_loss(model, paddle.ones([2, 3])))
    step.step(0.1)
    assert step.skipped.numpy().tolist() == [False] and not np.array_equal(model.weight.numpy(), before)


def test_a_forward_with_a_non_finite_loss_leaves_the_bn_statistics_as_they_were():
    from passl.engine.step import NormStatistics
    paddle.seed(4)
    model = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.Flatten())
    model.train()
    norms = NormStatistics(model)
    assert len(norms.tensors) == 2
    start = [t.numpy().copy() for t in norms.tensors]
    image = paddle.rand([2, 3, 6, 6])
    saved = norms.save()
    bad = model(image * float("inf")).mean()
    norms.keep_if_finite(saved, bad)
    assert not np.isfinite(bad.numpy())
    for tensor, before in zip(norms.tensors, start):
        np.testing.assert_array_equal(tensor.numpy(), before)
    saved = norms.save()
    good = model(image).mean()
    norms.keep_if_finite(saved, good)
    assert all(np.isfinite(t.numpy()).all() and not np.array_equal(t.numpy(), b) for t, b in zip(norms.tensors, start))


HAS_GPU = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="paddle.amp.GradScaler only scales and skips on a CUDA device")
def test_the_real_grad_scaler_reports_a_skipped_step():
    paddle.set_device("gpu")
    model = _linear()
    step = OptimizerStep(paddle.optimizer.AdamW(learning_rate=0.1, parameters=model.parameters()),
                         paddle.amp.GradScaler(init_loss_scaling=2.0 ** 16))
    before = model.weight.numpy().copy()
    with paddle.amp.auto_cast():
        loss = _loss(model, paddle.ones([2, 3])) * float("inf")
    step.backward(loss)
    step.step(0.1)
    assert step.skipped.numpy().tolist() == [True]
    np.testing.assert_array_equal(model.weight.numpy(), before)
