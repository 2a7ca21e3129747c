"""Model EMA: the update rule, float32 storage, independence from the live model."""
import numpy as np
import paddle

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
