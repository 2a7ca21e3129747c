"""build_run: where a run starts (fresh, --load weights, a checkpoint), and the checks made before
anything is trained."""
import numpy as np
import paddle
import pytest
from engine_helpers import tiny_config

from passl.config import load_config
from passl.engine.checkpoint import atomic_save
from passl.engine.setup import build_run, start_session
from passl.errors import ConfigError


def _build(cfg_path, **kwargs):
    run = build_run(start_session(load_config(cfg_path)), **kwargs)
    run.metrics.close()
    return run


def _weights(layer):
    return {k: v.numpy() for k, v in layer.state_dict().items()}


def test_load_starts_the_model_and_its_ema_from_the_weights(tmp_path, image_data):
    train_root, val_root = image_data
    fresh = _build(tiny_config(tmp_path, train_root, val_root))
    assert fresh.progress.global_step == 0 and fresh.progress.best is None
    weights = {k: v + 0.5 for k, v in fresh.raw_model.state_dict().items() if paddle.is_floating_point(v)}
    atomic_save(weights, str(tmp_path / "w.pdparams"))
    loaded = _build(tiny_config(tmp_path, train_root, val_root), load=str(tmp_path / "w.pdparams"))
    for name, value in _weights(loaded.raw_model).items():
        if name in weights:
            np.testing.assert_array_equal(value, weights[name].numpy(), err_msg=name)
            np.testing.assert_array_equal(loaded.ema.module.state_dict()[name].numpy(), value, err_msg=name)


def test_a_checkpoint_wins_over_load_and_gives_its_position(tmp_path, image_data):
    train_root, val_root = image_data
    cfg_path = tiny_config(tmp_path, train_root, val_root)
    first = _build(cfg_path)
    for value in first.raw_model.parameters():    # unlike the weights any fresh build starts from
        value.set_value(value + 1.0)
    first.progress.epoch, first.progress.global_step = 1, 3
    first.progress.best = {"top1": 12.5, "which": "model", "epoch": 1}
    atomic_save(first.state(), str(tmp_path / "out" / "latest.pdckpt"))
    atomic_save({k: v * 0 for k, v in first.raw_model.state_dict().items()}, str(tmp_path / "zeros.pdparams"))
    resumed = _build(cfg_path, resume="auto", load=str(tmp_path / "zeros.pdparams"))
    assert resumed.progress == first.progress
    for name, value in _weights(first.raw_model).items():
        np.testing.assert_array_equal(_weights(resumed.raw_model)[name], value, err_msg=name)
    log = (tmp_path / "out" / "train.log").read_text()
    assert f"resumed {tmp_path / 'out' / 'latest.pdckpt'}: epoch 1 batch 0 step 3" in log


def test_the_first_line_states_the_batch_arithmetic(tmp_path, image_data):
    train_root, val_root = image_data
    run = _build(tiny_config(tmp_path, train_root, val_root, train__accum_steps=2, data__train__batch_size=2))
    assert (run.global_batch, run.steps_per_epoch, run.optimizer_step.accum_steps) == (4, 3, 2)   # 12 images
    assert "global batch 4 (2 x 1 processes x 2 accumulation); 3 steps/epoch x 2 epochs; 12 training images" \
        in (tmp_path / "out" / "train.log").read_text()
    assert (tmp_path / "out" / "config.yaml").exists()


def test_configs_that_cannot_train_fail_while_building(tmp_path, image_data):
    train_root, val_root = image_data
    with pytest.raises(ConfigError, match=r"train.accum_steps: expected an integer >= 1, got 0 from .*tiny.yaml"):
        _build(tiny_config(tmp_path, train_root, val_root, train__accum_steps=0))
    with pytest.raises(ConfigError, match="data.train.dataset is not set"):
        _build(tiny_config(tmp_path, train_root, val_root, data__train__dataset=None))
    with pytest.raises(ConfigError, match="no full batch per epoch"):
        _build(tiny_config(tmp_path, train_root, val_root, data__train__batch_size=16))
