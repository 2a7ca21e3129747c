"""Checkpoint files: atomic writes, latest/best/keep_last, optimizer state by structured names."""
import os

import numpy as np
import paddle
import pytest

from passl.engine.checkpoint import (CheckpointManager, atomic_save, find_latest, load_file,
                                     optimizer_state_by_names, optimizer_state_from_names, weights_from)
from passl.errors import CheckpointError


def test_atomic_save_leaves_no_temporaries(tmp_path, monkeypatch):
    path = str(tmp_path / "a.pdckpt")
    atomic_save({"x": paddle.ones([2])}, path)
    assert os.listdir(tmp_path) == ["a.pdckpt"]

    def broken(obj, p):
        with open(p, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(paddle, "save", broken)
    with pytest.raises(OSError):
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


def test_weights_from_checkpoint_prefers_recorded_best():
    ckpt = {"model": {"w": 1}, "ema": {"w": 2}, "best": {"which": "ema"}}
    assert weights_from(ckpt) == ({"w": 2}, "ema")
    assert weights_from({**ckpt, "best": {"which": "model"}}) == ({"w": 1}, "model")
    assert weights_from({"head.weight": 3}) == ({"head.weight": 3}, "weights")
