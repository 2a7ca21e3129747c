"""Checkpoints written before the restricted readers existed (``paddle.save`` of the trainer's state,
read back with ``paddle.load``) still load and resume.

The checkpoint is made the way those versions made it: a trainer run, then ``paddle.save`` of its
state with a real loss-scaler state added (a GPU run with AMP has one; Paddle disables the scaler on
the CPU, so its device check is stubbed while the scaler is built). ``paddle.load`` is the oracle."""
import os
import random
import sys
from unittest import mock

import numpy as np
import paddle
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine"))
from crafted import assert_same  # noqa: E402
from engine_helpers import make_image_folder, tiny_config  # noqa: E402

from passl.config import load_config  # noqa: E402
from passl.engine.checkpoint import load_file, set_rng_state  # noqa: E402
from passl.engine import train as run_training  # noqa: E402

pytestmark = pytest.mark.slow


class _GpuPlace:
    def is_gpu_place(self):
        return True


def _enabled_scaler(**kwargs):
    tracer = mock.Mock(_expected_place=_GpuPlace())
    with mock.patch("paddle.amp.grad_scaler._dygraph_tracer", return_value=tracer):
        return paddle.amp.GradScaler(**kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("old")
    train, val = make_image_folder(base / "train", per_class=4), make_image_folder(base / "val", per_class=1, seed=1)
    straight, split = base / "straight", base / "split"
    straight.mkdir()
    split.mkdir()
    assert run_training(load_config(tiny_config(straight, train, val, epochs=2))) == 0
    assert run_training(load_config(tiny_config(split, train, val, epochs=1))) == 0
    old = paddle.load(str(split / "out" / "latest.pdckpt"))       # the state as the old reader returned it
    scaler = _enabled_scaler(init_loss_scaling=1024.0, incr_every_n_steps=7)
    scaler._incr_count, scaler._decr_count = 3, 1
    old["scaler"] = scaler.state_dict()
    assert isinstance(old["scaler"]["scale"], np.ndarray) and old["scaler"]["incr_count"] == 3
    path = str(base / "old.pdckpt")
    paddle.save(old, path)
    return {"train": train, "val": val, "path": path, "straight": straight, "base": base}


def test_old_checkpoint_reads_as_paddle_load_read_it(runs):
    ours, oracle = load_file(runs["path"]), paddle.load(runs["path"])
    assert_same(ours, oracle)
    assert isinstance(ours["rng"]["numpy"], tuple) and ours["rng"]["numpy"][0] == "MT19937"
    assert isinstance(ours["rng"]["python"], tuple) and isinstance(ours["rng"]["paddle_cpu"],
                                                                   paddle.base.core.GeneratorState)

    scaler = _enabled_scaler()
    scaler.load_state_dict(ours["scaler"])                       # Paddle's own loader takes it
    assert scaler.state_dict()["incr_count"] == 3 and float(scaler.state_dict()["scale"][0]) == 1024.0

    set_rng_state(oracle["rng"])
    expected = (np.random.random(3), random.random(), paddle.rand([3]).numpy())
    set_rng_state(ours["rng"])
    got = (np.random.random(3), random.random(), paddle.rand([3]).numpy())
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_old_checkpoint_resumes_to_the_uninterrupted_result(runs):
    resumed = runs["base"] / "resumed"
    resumed.mkdir()
    cfg = load_config(tiny_config(resumed, runs["train"], runs["val"], epochs=2))
    assert run_training(cfg, resume=runs["path"]) == 0
    final, expected = load_file(str(resumed / "out" / "latest.pdckpt")), load_file(
        str(runs["straight"] / "out" / "latest.pdckpt"))
    assert final["epoch"] == 2 and final["global_step"] == expected["global_step"]
    for part in ("model", "ema"):
        for key in expected[part]:
            np.testing.assert_array_equal(final[part][key].numpy(), expected[part][key].numpy(), err_msg=key)


def test_resume_from_a_weights_file_says_to_use_load(runs, tmp_path):
    from passl.errors import CheckpointError
    from passl.io import write_safetensors
    weights = str(tmp_path / "w.safetensors")
    write_safetensors({"w": np.ones(2, np.float32)}, weights)
    cfg = load_config(tiny_config(tmp_path, runs["train"], runs["val"], epochs=1))
    with pytest.raises(CheckpointError, match="not a training checkpoint .* use --load"):
        run_training(cfg, resume=weights)
