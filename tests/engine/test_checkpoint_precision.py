"""Resuming across AMP levels and device counts: checkpoint weights are float32 whatever the AMP level,
an O2 checkpoint (float16 parameters, float32 master weights in the optimizer) resumes under O2, O1 or
without AMP, and a checkpoint whose random state lists 8 GPUs resumes on 1 GPU or the CPU.

Paddle's ``amp.decorate`` does nothing on the CPU (it warns and keeps float32), so O2 is emulated as it
leaves a model and an optimizer: float16 Linear parameters (norm layers stay float32), a
multi-precision AdamW whose master weights and accumulators are made by its own
``_create_accumulators``, as its first ``step`` does."""
import numpy as np
import paddle
import pytest
from paddle.base import unique_name

from passl.engine import checkpoint as ck
from passl.engine.checkpoint import Progress, atomic_save, load_file, restore_training_state, training_state
from passl.engine.ema import ModelEma
from passl.engine.step import OptimizerStep

CFG = {"seed": 3, "data": {"train": {"batch_size": 4}}}
HAS_GPU = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def _pieces(seed, o2=False):
    """model, OptimizerStep, EMA as build_run makes them; ``o2``: decorated as AMP O2 leaves them."""
    paddle.seed(seed)
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4), paddle.nn.Linear(4, 2))
    ema = ModelEma(model, decay=0.5)                 # built from the float32 model, before decorate
    step = OptimizerStep(paddle.optimizer.AdamW(learning_rate=0.01, parameters=model.parameters(),
                                                multi_precision=o2))
    if o2:
        for layer in (model[0], model[2]):
            layer.to(dtype="float16")
    return model, step, ema


def _create_accumulators(step):
    """What the optimizer's first step creates (master weights, moments), under the step's own names."""
    opt = step.optimizer
    trained = [p for p in opt._parameter_list if not p.stop_gradient]    # those a step has gradients for
    with unique_name.guard(step._names):
        opt._create_accumulators(paddle.static.default_main_program().global_block(), trained)


def _trained_o2(seed=0):
    """An O2 run after some steps: float32 master weights off the float16 grid, moments non-zero."""
    model, step, ema = _pieces(seed, o2=True)
    _create_accumulators(step)
    rng = np.random.default_rng(seed)
    opt = step.optimizer
    for name, param in model.named_parameters():
        master = opt._master_weights.get(param.name)
        if master is not None:
            master.set_value(paddle.to_tensor(rng.normal(size=master.shape).astype("float32")))
            param.set_value(master.astype("float16"))
    for accumulators in opt._accumulators.values():
        for acc in accumulators.values():
            acc.set_value(paddle.to_tensor(rng.uniform(0.1, 1, size=acc.shape).astype(str(acc.dtype)[7:])))
    return model, step, ema


def _masters_by_structured(model, step):
    return {n: step.optimizer._master_weights[p.name].numpy() for n, p in model.named_parameters()
            if p.name in step.optimizer._master_weights}


def _moments_by_structured(model, step):
    """{(structured name, 'moment1'|...): array} whatever the AMP level named the accumulators."""
    internal = {p.name: n for n, p in model.named_parameters()}
    out = {}
    for kind, accumulators in step.optimizer._accumulators.items():
        for owner, acc in accumulators.items():
            out[(internal[owner.replace("_fp32_master_0", "")], kind)] = acc.numpy()
    return out


def test_float16_weights_do_not_load_into_a_float32_model():
    """The failure a resumed O2 run met: Paddle refuses a float16 state dict for float32 parameters."""
    model, _, _ = _pieces(0)
    half = {k: v.astype("float16") for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match="(?i)dtype"):
        _pieces(1)[0].set_state_dict(half)


def test_an_o2_checkpoint_holds_the_float32_master_weights(tmp_path):
    model, step, ema = _trained_o2()
    masters = _masters_by_structured(model, step)
    assert set(masters) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    atomic_save(training_state(model, step, ema, Progress(epoch=1), CFG, world_size=1), str(tmp_path / "c"))
    ckpt = load_file(str(tmp_path / "c"))
    for name, value in ckpt["model"].items():
        assert value.dtype == paddle.float32, name
        if name in masters:   # the exact float32 values, not the float16 parameters cast up
            np.testing.assert_array_equal(value.numpy(), masters[name])
    assert "master_weights" not in ckpt["optimizer"]
    assert not any("fp32_master" in key for key in ckpt["optimizer"])
    assert "0.weight/moment1_0" in ckpt["optimizer"]


@pytest.mark.parametrize("level", ["off", "O2"])
def test_an_o2_checkpoint_resumes_with_or_without_amp(tmp_path, level):
    model, step, ema = _trained_o2()
    masters, moments = _masters_by_structured(model, step), _moments_by_structured(model, step)
    atomic_save(training_state(model, step, ema, Progress(epoch=1, global_step=4), CFG, world_size=1),
                str(tmp_path / "c"))
    ckpt = load_file(str(tmp_path / "c"))
    model2, step2, ema2 = _pieces(1, o2=level == "O2")
    assert restore_training_state(ckpt, "c", model2, step2, ema2).global_step == 4
    _create_accumulators(step2)                   # the first step: takes the restored state or fails
    assert _moments_by_structured(model2, step2).keys() == moments.keys()
    for key, value in _moments_by_structured(model2, step2).items():
        np.testing.assert_array_equal(value, moments[key], err_msg=str(key))
    if level == "O2":
        assert model2[0].weight.dtype == paddle.float16
        for name, value in _masters_by_structured(model2, step2).items():
            np.testing.assert_array_equal(value, masters[name], err_msg=name)
    else:
        np.testing.assert_array_equal(model2[0].weight.numpy(), masters["0.weight"])
        step2.backward(model2(paddle.rand([6, 3])).pow(2).mean())   # a real float32 step runs
        step2.step(0.01)


def test_a_float32_checkpoint_resumes_under_o2_and_an_older_o2_checkpoint_still_loads(tmp_path):
    model, step, ema = _pieces(0)
    step.backward(model(paddle.rand([6, 3])).pow(2).mean())
    step.step(0.01)
    ckpt = training_state(model, step, ema, Progress(epoch=1), CFG, world_size=1)
    model2, step2, ema2 = _pieces(1, o2=True)
    restore_training_state(ckpt, "c", model2, step2, ema2)
    _create_accumulators(step2)
    np.testing.assert_array_equal(_masters_by_structured(model2, step2)["0.weight"], model[0].weight.numpy())

    # written before weights were stored in float32: float16 model weights, masters in the optimizer
    o2, o2_step, o2_ema = _trained_o2()
    older = training_state(o2, o2_step, o2_ema, Progress(epoch=1), CFG, world_size=1)
    older["model"] = o2.state_dict()
    older["optimizer"]["master_weights"] = _masters_by_structured(o2, o2_step)
    older["optimizer"] = {k.replace("/", "/fp32_master_0_") if k.split("/")[0] in older["optimizer"]["master_weights"]
                          else k: v for k, v in older["optimizer"].items()}
    model3, step3, ema3 = _pieces(2)
    restore_training_state(older, "c", model3, step3, ema3)
    np.testing.assert_array_equal(model3[0].weight.numpy(), _masters_by_structured(o2, o2_step)["0.weight"])


def test_an_rng_state_of_8_gpus_resumes_on_the_cpu():
    """The older layout listed every visible GPU; paddle.set_rng_state refuses such a list elsewhere."""
    eight = [paddle.get_rng_state("cpu")[0]] * 8
    with pytest.raises(ValueError, match="(?i)length"):
        paddle.set_rng_state(eight, "cpu")
    paddle.seed(5)
    saved_cpu = paddle.get_rng_state("cpu")[0]
    expected = paddle.rand([3]).numpy()
    np.random.seed(1)
    state = {"paddle": eight, "cuda": eight, "numpy": np.random.get_state(), "python": ck.random.getstate()}
    ck.set_rng_state(state)                                        # no error; numpy restored
    assert np.random.get_state()[1][0] == state["numpy"][1][0]
    ck.set_rng_state({**ck.rng_state(), "paddle_cpu": saved_cpu})   # this version's layout
    np.testing.assert_array_equal(paddle.rand([3]).numpy(), expected)


class FakeGpuGenerators:
    """paddle.device.get_device / get_rng_state / set_rng_state of a process on ``gpu:<index>`` of
    ``count`` visible GPUs (states are plain strings here)."""

    def __init__(self, monkeypatch, index, count):
        self.states = [f"gpu{i}-initial" for i in range(count)]
        real_get, real_set = paddle.get_rng_state, paddle.set_rng_state
        monkeypatch.setattr(paddle.device, "get_device", lambda: f"gpu:{index}")
        monkeypatch.setattr(paddle, "get_rng_state", lambda device=None: list(self.states) if device == "gpu"
                            else real_get(device))

        def set_state(states, device=None):
            if device != "gpu":
                return real_set(states, device)
            if len(states) != len(self.states):
                raise ValueError("Length of gpu state list should be equal to the gpu device count")
            self.states = list(states)
        monkeypatch.setattr(paddle, "set_rng_state", set_state)


def test_gpu_rng_state_is_this_devices_own_and_restores_on_any_device_count(monkeypatch):
    saver = FakeGpuGenerators(monkeypatch, index=3, count=8)
    saver.states[3] = "rank3-state"
    state = ck.rng_state()
    assert state["paddle_device"] == {"device": "gpu:3", "state": "rank3-state"}
    resumer = FakeGpuGenerators(monkeypatch, index=0, count=1)     # 1 GPU now
    ck.set_rng_state(state)
    assert resumer.states == ["rank3-state"]
    older = {"paddle": [f"old{i}" for i in range(8)], "cuda": [f"old{i}" for i in range(8)],
             "numpy": np.random.get_state(), "python": ck.random.getstate()}
    said = []
    ck.set_rng_state(older, log=said.append)                       # 8 listed, 1 visible: not restored
    assert resumer.states == ["rank3-state"] and "lists 8 devices" in said[0]
    same = FakeGpuGenerators(monkeypatch, index=2, count=8)
    ck.set_rng_state(older)
    assert same.states[2] == "old2" and same.states[0] == "gpu0-initial"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="AMP O2 decorate and GradScaler act only on a CUDA device")
def test_a_real_o2_run_resumes_without_amp_and_under_o2(tmp_path):
    paddle.set_device("gpu")
    model, step, ema = _pieces(0)
    model, opt = paddle.amp.decorate(models=model, optimizers=step.optimizer, level="O2", master_weight=True)
    step.optimizer = opt
    with paddle.amp.auto_cast(level="O2"):
        loss = model(paddle.rand([6, 3])).astype("float32").pow(2).mean()
    step.backward(loss)
    step.step(0.01)
    ckpt = training_state(model, step, ema, Progress(epoch=1), CFG, world_size=1)
    assert all(v.dtype == paddle.float32 for v in ckpt["model"].values())
    for level in ("off", "O2"):
        model2, step2, ema2 = _pieces(1)
        if level == "O2":
            model2, step2.optimizer = paddle.amp.decorate(models=model2, optimizers=step2.optimizer, level="O2",
                                                          master_weight=True)
        restore_training_state(ckpt, "c", model2, step2, ema2)
        with paddle.amp.auto_cast(enable=level == "O2", level="O2"):
            loss = model2(paddle.rand([6, 3])).astype("float32").pow(2).mean()
        step2.backward(loss)
        step2.step(0.01)
