"""Checkpoint files: atomic writes, latest/best/keep_last, optimizer state by structured names, and the
training state: assembled, restored into a new run, refused when it cannot be continued."""
import os

import numpy as np
import paddle
import pytest

from passl.engine.checkpoint import (CheckpointManager, Progress, atomic_save, check_mid_epoch_resume,
                                     check_resumable, find_latest, load_file, optimizer_state_by_names,
                                     optimizer_state_from_names, recorded_lr_scaling, restore_training_state,
                                     training_state)
from passl.engine.ema import ModelEma
from passl.engine.step import OptimizerStep
from passl.errors import CheckpointError, WriteError


def test_atomic_save_leaves_no_temporaries(tmp_path, monkeypatch):
    path = str(tmp_path / "a.pdckpt")
    atomic_save({"x": paddle.ones([2])}, path)
    assert os.listdir(tmp_path) == ["a.pdckpt"]

    def broken(obj, p):
        with open(p, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(paddle, "save", broken)
    with pytest.raises(WriteError, match=r"cannot write .*a.pdckpt: disk full$"):   # one line naming the file
        atomic_save({"x": 1}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["a.pdckpt"]          # the old file survives, no temp left
    np.testing.assert_array_equal(load_file(path)["x"].numpy(), [1, 1])


def test_manager_keeps_last_and_links_latest_best(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    for epoch in range(1, 5):
        manager.save_epoch({"epoch": epoch}, epoch, is_best=epoch == 2, best_weights={"w": paddle.ones([1])})
    names = sorted(os.listdir(tmp_path))
    assert names == ["best.pdckpt", "best_model.pdparams", "best_model.safetensors", "epoch_0003.pdckpt",
                     "epoch_0004.pdckpt", "latest.pdckpt"]
    from passl.io import read_safetensors, safetensors_metadata
    assert read_safetensors(str(tmp_path / "best_model.safetensors"))["w"].tolist() == [1.0]
    assert safetensors_metadata(str(tmp_path / "best_model.safetensors"))["epoch"] == "2"
    assert load_file(str(tmp_path / "best.pdckpt"))["epoch"] == 2
    assert load_file(find_latest(str(tmp_path)))["epoch"] == 4
    manager.save_latest({"epoch": 4, "batch": 3})
    assert load_file(str(tmp_path / "epoch_0004.pdckpt")) == {"epoch": 4}   # the link was replaced, not written through


def test_find_latest_and_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_latest(str(tmp_path))
    (tmp_path / "junk.pdckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pdckpt"):
        load_file(str(tmp_path / "junk.pdckpt"))
    with pytest.raises(CheckpointError, match="not found"):
        load_file(str(tmp_path / "missing.pdckpt"))


def _model_and_opt():
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.LayerNorm(4))
    opt = paddle.optimizer.AdamW(learning_rate=0.01, parameters=model.parameters())
    return model, opt


def test_optimizer_state_survives_new_internal_names(tmp_path):
    paddle.seed(0)
    model, opt = _model_and_opt()
    for _ in range(2):
        model(paddle.rand([5, 3])).pow(2).sum().backward()
        opt.step()
        opt.clear_grad()
    atomic_save({"opt": optimizer_state_by_names(opt, model), "model": model.state_dict()}, str(tmp_path / "c"))
    saved = load_file(str(tmp_path / "c"))["opt"]   # through a file: no tensors shared with `opt`
    assert any(k.startswith("0.weight/") for k in saved)
    model2, opt2 = _model_and_opt()                     # other internal names (linear_1 ...)
    assert model2[0].weight.name != model[0].weight.name
    model2.set_state_dict(model.state_dict())
    opt2.set_state_dict(optimizer_state_from_names(saved, model2))
    x = paddle.rand([5, 3])
    for m, o in ((model, opt), (model2, opt2)):
        m(x).pow(2).sum().backward()
        o.step()
    np.testing.assert_array_equal(model[0].weight.numpy(), model2[0].weight.numpy())


def _run_pieces(seed):
    """A model with BN statistics, its OptimizerStep and EMA, as build_run makes them (new internal names
    on every call)."""
    paddle.seed(seed)
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4), paddle.nn.Linear(4, 2))
    return model, OptimizerStep(paddle.optimizer.AdamW(learning_rate=0.01, parameters=model.parameters())), \
        ModelEma(model, decay=0.5)


def _train_steps(model, step, ema, n):
    for i in range(n):
        step.backward(model(paddle.rand([6, 3])).pow(2).mean())
        step.step(0.01)
        ema.update(model)


CFG = {"seed": 3, "data": {"train": {"batch_size": 4}}}


def test_training_state_restores_into_a_new_run(tmp_path):
    model, step, ema = _run_pieces(0)
    _train_steps(model, step, ema, 2)
    progress = Progress(epoch=1, batch=2, global_step=5, best={"top1": 50.0, "which": "ema", "epoch": 1})
    atomic_save(training_state(model, step, ema, progress, CFG, world_size=1, num_samples=50, global_batch=4,
                               base_lr=0.01), str(tmp_path / "c.pdckpt"))
    next_draw = paddle.rand([4]).numpy()                 # the stream continues from the saved generator state
    ckpt = load_file(str(tmp_path / "c.pdckpt"))
    assert ckpt["sampler"] == {"epoch": 1, "batch": 2, "seed": 3, "world_size": 1, "batch_size": 4,
                               "num_samples": 50, "global_batch": 4}
    assert recorded_lr_scaling(ckpt) == (4, 0.01)

    model2, step2, ema2 = _run_pieces(1)
    check_resumable(ckpt, "c.pdckpt", world_size=1, batch_size=4)
    assert restore_training_state(ckpt, "c.pdckpt", model2, step2, ema2) == progress
    np.testing.assert_array_equal(paddle.rand([4]).numpy(), next_draw)
    for a, b in ((model, model2), (ema.module, ema2.module)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=name)
    paddle.seed(9)
    _train_steps(model, step, ema, 1)
    paddle.seed(9)
    _train_steps(model2, step2, ema2, 1)                 # Adam moments came back too: the same next step
    np.testing.assert_array_equal(model[0].weight.numpy(), model2[0].weight.numpy())


def test_an_ema_the_checkpoint_lacks_starts_from_the_restored_weights(tmp_path):
    model, step, _ = _run_pieces(0)
    _train_steps(model, step, ModelEma(model), 1)
    ckpt = training_state(model, step, None, Progress(epoch=1), CFG, world_size=1)
    assert ckpt["ema"] is None
    model2, step2, ema2 = _run_pieces(1)
    restore_training_state(ckpt, "c.pdckpt", model2, step2, ema2)
    np.testing.assert_array_equal(ema2.module[0].weight.numpy(), model[0].weight.numpy())
    model2[0].weight.set_value(paddle.zeros([3, 4]))
    assert np.abs(ema2.module[0].weight.numpy()).sum() > 0   # a copy, not the model's own tensor


def test_resume_refuses_what_it_cannot_continue():
    model, step, ema = _run_pieces(0)
    mid_epoch = training_state(model, step, ema, Progress(epoch=1, batch=2, global_step=5), CFG, world_size=2)
    with pytest.raises(CheckpointError, match="stopped mid-epoch with 2 processes x batch 4"):
        check_resumable(mid_epoch, "c.pdckpt", world_size=1, batch_size=4)
    with pytest.raises(CheckpointError, match="stopped mid-epoch with 2 processes x batch 4"):
        check_resumable(mid_epoch, "c.pdckpt", world_size=2, batch_size=8)
    check_resumable(mid_epoch, "c.pdckpt", world_size=2, batch_size=4)
    epoch_end = training_state(model, step, ema, Progress(epoch=2, global_step=6), CFG, world_size=2)
    check_resumable(epoch_end, "c.pdckpt", world_size=1, batch_size=8)   # an epoch boundary fits any cluster
    with pytest.raises(CheckpointError, match="c.pdckpt: not a training checkpoint .no 'optimizer'.; use --load"):
        check_resumable({"model": {}, "epoch": 1}, "c.pdckpt", 1, 4)
    other_model = paddle.nn.Sequential(paddle.nn.Linear(3, 4))
    with pytest.raises(CheckpointError, match="model keys do not match"):
        restore_training_state(epoch_end, "c.pdckpt", other_model, step, None)


def test_a_mid_epoch_resume_needs_the_same_training_set_and_global_batch():
    model, step, ema = _run_pieces(0)
    mid_epoch = training_state(model, step, ema, Progress(epoch=1, batch=2, global_step=5), CFG, world_size=2,
                               num_samples=100, global_batch=8, base_lr=0.01)
    assert check_mid_epoch_resume(mid_epoch, "c.pdckpt", 100, 8) is None
    with pytest.raises(CheckpointError, match=r"c.pdckpt stopped mid-epoch .2 batches into epoch 2. on a training "
                                              r"set of 100 images, but data.train.dataset now has 90"):
        check_mid_epoch_resume(mid_epoch, "c.pdckpt", 90, 8)
    with pytest.raises(CheckpointError, match="global batch of 8, this run has 16"):
        check_mid_epoch_resume(mid_epoch, "c.pdckpt", 100, 16)
    epoch_end = training_state(model, step, ema, Progress(epoch=2, global_step=6), CFG, world_size=2,
                               num_samples=100, global_batch=8)
    assert check_mid_epoch_resume(epoch_end, "c.pdckpt", 90, 16) is None     # an epoch boundary: anything goes


def test_checkpoints_without_the_new_records_still_resume():
    """Written before num_samples, global_batch and base_lr were recorded: resumable, the checks that need
    them skipped (with a warning mid-epoch), the global batch worked out from the sampler and config."""
    model, step, ema = _run_pieces(0)
    old = training_state(model, step, ema, Progress(epoch=1, batch=2, global_step=5), CFG, world_size=2)
    for key in ("num_samples", "global_batch"):
        del old["sampler"][key]
    del old["base_lr"]
    old["config"] = {**CFG, "train": {"accum_steps": 3}}
    check_resumable(old, "c.pdckpt", world_size=2, batch_size=4)
    assert "does not record its training set's size" in check_mid_epoch_resume(old, "c.pdckpt", 90, 24)
    assert recorded_lr_scaling(old) == (24, None)
    model2, step2, ema2 = _run_pieces(1)
    assert restore_training_state(old, "c.pdckpt", model2, step2, ema2) == Progress(epoch=1, batch=2, global_step=5)


def test_keep_last_zero_keeps_only_latest_and_best(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=0)
    paths = [manager.save_epoch({"epoch": epoch}, epoch, is_best=epoch == 1) for epoch in (1, 2)]
    assert sorted(os.listdir(tmp_path)) == ["best.pdckpt", "latest.pdckpt"]
    assert paths == [str(tmp_path / "latest.pdckpt")] * 2                  # the file the log line names exists
    assert load_file(str(tmp_path / "latest.pdckpt"))["epoch"] == 2 and load_file(str(tmp_path / "best.pdckpt"))["epoch"] == 1
