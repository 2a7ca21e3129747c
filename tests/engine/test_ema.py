"""Model EMA: the update rule, float32 storage, independence from the live model."""
import numpy as np
import paddle
import pytest

from passl.engine.ema import ModelEma


def test_ema_update_rule_and_copy():
    paddle.seed(1)
    model = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.BatchNorm1D(3))
    ema = ModelEma(model, decay=0.9)
    start = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    for key, value in model.state_dict().items():     # move the live weights
        value.set_value(value + 1.5)
    ema.update(model)
    for key, value in ema.state_dict().items():
        assert value.dtype == paddle.float32
        np.testing.assert_allclose(value.numpy(), 0.9 * start[key] + 0.1 * (start[key] + 1.5), rtol=1e-6, atol=1e-6)
    # a second update keeps compounding: e2 = 0.9 e1 + 0.1 w
    ema.update(model)
    for key, value in ema.state_dict().items():
        e1 = 0.9 * start[key] + 0.1 * (start[key] + 1.5)
        np.testing.assert_allclose(value.numpy(), 0.9 * e1 + 0.1 * (start[key] + 1.5), rtol=1e-6, atol=1e-6)
    # the EMA is its own copy and evaluates without gradients
    assert not ema.module.training
    assert all(p.stop_gradient for p in ema.module.parameters())
    model[0].weight.set_value(paddle.zeros([4, 3]))
    assert np.abs(ema.module[0].weight.numpy()).sum() > 0


def test_ema_state_round_trip():
    model = paddle.nn.Linear(2, 2)
    ema = ModelEma(model, decay=0.5)
    with paddle.no_grad():
        model.weight.set_value(model.weight * 0 + 4.0)
    ema.update(model)
    other = ModelEma(paddle.nn.Linear(2, 2), decay=0.5)
    other.set_state_dict(ema.state_dict())
    np.testing.assert_array_equal(other.module.weight.numpy(), ema.module.weight.numpy())


def test_under_o2_the_ema_follows_the_float32_master_weights():
    """AMP O2 leaves float16 parameters and float32 master copies in the optimizer (emulated: decorate
    does nothing on the CPU); the EMA averages the masters, not the parameters rounded to float16."""
    paddle.seed(2)
    model = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.LayerNorm(3))
    ema = ModelEma(model, decay=0.75)
    start = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    model[0].to(dtype="float16")                       # what O2 casts; the norm layer stays float32
    rng = np.random.default_rng(0)
    masters = {}
    for name, p in model.named_parameters():
        if p.dtype == paddle.float16:
            master = paddle.to_tensor(rng.normal(size=p.shape).astype("float32"))
            p.set_value(master.astype("float16"))
            masters[p.name] = master

    class Optimizer:
        _master_weights = masters
    ema.update(model, Optimizer())
    for name, p in model.named_parameters():
        target = masters[p.name].numpy() if p.name in masters else p.numpy()
        expected = 0.75 * start[name] + 0.25 * target.astype(np.float64)
        value = ema.state_dict()[name]
        assert value.dtype == paddle.float32
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=name)
    half_rounded = 0.75 * start["0.weight"] + 0.25 * model[0].weight.numpy().astype(np.float64)
    assert np.abs(ema.state_dict()["0.weight"].numpy() - half_rounded).max() > 1e-5   # not the float16 values


def test_the_update_touches_one_flat_buffer_that_the_module_shares(monkeypatch):
    paddle.seed(3)
    model = paddle.nn.Sequential(*[paddle.nn.Linear(3, 3) for _ in range(20)])
    ema = ModelEma(model, decay=0.5)
    calls, real_lerp = [], paddle.Tensor.lerp_
    monkeypatch.setattr(paddle.Tensor, "lerp_",
                        lambda self, *a, **k: calls.append(self.shape) or real_lerp(self, *a, **k))
    monkeypatch.setattr(paddle, "lerp", lambda *a, **k: calls.append("out of place"))
    ema.update(model)
    monkeypatch.undo()
    assert calls == [[20 * 12]]                          # one lerp over every averaged value
    assert all(ema._flat._is_shared_buffer_with(t) for t in ema.module.state_dict().values())
    assert not any(ema._flat._is_shared_buffer_with(t) for t in model.state_dict().values())
    other = ModelEma(model, decay=0.5)
    other.set_state_dict(ema.state_dict())
    model[5].bias.set_value(model[5].bias + 2.0)
    ema.update(model)
    other.update(model)
    np.testing.assert_array_equal(ema.module[5].bias.numpy(), other.state_dict()["5.bias"].numpy())
    assert all(other._flat._is_shared_buffer_with(t) for t in other.module.state_dict().values())
    assert [list(t.shape) for t in other.module.state_dict().values()] == [[3, 3], [3]] * 20


@pytest.mark.gpu
@pytest.mark.skipif(not (paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0),
                    reason="AMP O2 decorate casts the model only on a CUDA device")
def test_a_real_o2_step_is_followed_by_the_ema_in_float32():
    paddle.set_device("gpu")
    model = paddle.nn.Sequential(paddle.nn.Linear(8, 8), paddle.nn.LayerNorm(8))
    ema = ModelEma(model, decay=0.0)                   # decay 0: the EMA is the latest weights
    opt = paddle.optimizer.AdamW(learning_rate=0.01, parameters=model.parameters(), multi_precision=True)
    model, opt = paddle.amp.decorate(models=model, optimizers=opt, level="O2", master_weight=True)
    with paddle.amp.auto_cast(level="O2"):
        loss = model(paddle.rand([4, 8])).astype("float32").pow(2).mean()
    loss.backward()
    opt.step()
    ema.update(model, opt)
    master = opt._master_weights[model[0].weight.name]
    np.testing.assert_array_equal(ema.state_dict()["0.weight"].numpy(), master.numpy())
