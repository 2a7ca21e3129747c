"""train / fit / evaluate_only on a tiny LV-ViT and synthetic images: exact resume, NaN stop, Ctrl-C,
evaluate-only, output-dir checks. Expected weights come from an uninterrupted run, never from the
code under test."""
import json
import os
import signal

import numpy as np
import paddle
import pytest
from engine_helpers import child_processes, tiny_config

import passl
from passl.config import load_config
from passl.engine import evaluate_only, guards, train
from passl.engine.checkpoint import load_file
from passl.engine.setup import build_run, start_session
from passl.engine.step import OptimizerStep
from passl.engine.trainer import fit
from passl.errors import CheckpointError, PasslError


def _run(cfg_path, **train_kwargs):
    return train(load_config(cfg_path), **train_kwargs)


def _fit(cfg_path):
    """build_run + fit, the pieces ``train`` composes, keeping the run for inspection."""
    run = build_run(start_session(load_config(cfg_path)))
    with run.metrics:
        return run, fit(run)


def _assert_same_state(a, b):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            np.testing.assert_array_equal(a[part][key].numpy(), b[part][key].numpy(), err_msg=f"{part}.{key}")
    for key in a["optimizer"]:
        value = a["optimizer"][key]
        if isinstance(value, paddle.Tensor):
            np.testing.assert_array_equal(value.numpy(), b["optimizer"][key].numpy(), err_msg=key)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]


@pytest.mark.parametrize("stop_at_step", [3, 4], ids=["epoch_boundary", "mid_epoch"])
def test_resume_is_exact(tmp_path, image_data, monkeypatch, stop_at_step):
    """2 epochs straight == stop (SIGINT) at a step, resume from latest, finish: identical weights."""
    train_root, val_root = image_data
    handler_before = signal.getsignal(signal.SIGINT)
    straight_dir, split_dir = tmp_path / "a", tmp_path / "b"
    straight_dir.mkdir()
    split_dir.mkdir()
    code = _run(tiny_config(straight_dir, train_root, val_root))
    assert code == 0
    expected = load_file(str(straight_dir / "out" / "latest.pdckpt"))

    original, steps = OptimizerStep.step, [0]

    def step_then_interrupt(self, lr):
        original(self, lr)
        steps[0] += 1                                 # the run starts at global step 0
        if steps[0] == stop_at_step:
            os.kill(os.getpid(), signal.SIGINT)       # a real Ctrl-C, handled at the step boundary

    cfg_path = tiny_config(split_dir, train_root, val_root)
    with monkeypatch.context() as patch:
        patch.setattr(OptimizerStep, "step", step_then_interrupt)
        code = _run(cfg_path)
    assert code == 130
    stopped = load_file(str(split_dir / "out" / "latest.pdckpt"))
    assert stopped["global_step"] == stop_at_step
    assert (stopped["epoch"], stopped["batch"]) == ((1, 0) if stop_at_step == 3 else (1, 1))
    assert signal.getsignal(signal.SIGINT) is handler_before                # handlers restored
    code = _run(cfg_path, resume="auto")
    assert code == 0
    _assert_same_state(expected, load_file(str(split_dir / "out" / "latest.pdckpt")))
    lines = [json.loads(x) for x in (split_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert {"train_loss", "val_top1", "val_top5", "ema_top1", "ema_top5", "lr", "wall_time"} <= lines[-1].keys()
    log = (split_dir / "out" / "train.log").read_text()
    for field in ("epoch 2/2", "lr ", "loss_cls", "loss_dense", "samples/s", "data wait", "eta ", "done: 2 epochs"):
        assert field in log, field
    assert any(name.startswith("vdlrecords") for name in os.listdir(split_dir / "out" / "vdl"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, image_data, monkeypatch, capsys):
    train_root, val_root = image_data
    _nan_at({5}, monkeypatch)                        # global step 4: epoch 2, second batch
    out = tmp_path / "out"
    code = _run(tiny_config(tmp_path, train_root, val_root, epochs=3))
    assert code == 1
    assert "NaN or infinite at global step 4" in capsys.readouterr().out
    assert sorted(p for p in os.listdir(out) if p.endswith(".pdckpt")) == ["best.pdckpt", "epoch_0001.pdckpt",
                                                                           "latest.pdckpt"]
    latest = load_file(str(out / "latest.pdckpt"))
    assert latest["epoch"] == 1 and latest["global_step"] == 3
    assert all(np.isfinite(v.numpy()).all() for v in latest["model"].values())


@pytest.mark.parametrize("rule", ["model", "ema"])
def test_best_is_selected_by_the_configured_rule_and_recorded(tmp_path, image_data, rule):
    """train.select_best decides whose weights best_model.pdparams holds; the rule is kept in the
    checkpoint's best record and in each evaluated epoch's metrics.jsonl line."""
    train_root, val_root = image_data
    code = _run(tiny_config(tmp_path, train_root, val_root, epochs=1, train__select_best=rule))
    assert code == 0
    out = tmp_path / "out"
    latest = load_file(str(out / "latest.pdckpt"))
    assert latest["best"]["rule"] == rule and latest["best"]["which"] == rule and latest["best"]["epoch"] == 1
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["select_best"] == rule
    assert latest["best"]["top1"] == record["val_top1" if rule == "model" else "ema_top1"]
    best_weights = paddle.load(str(out / "best_model.pdparams"))
    chosen, other = (latest["model"], latest["ema"]) if rule == "model" else (latest["ema"], latest["model"])
    key = "head.weight"
    np.testing.assert_array_equal(best_weights[key].numpy(), chosen[key].numpy())
    assert not np.array_equal(best_weights[key].numpy(), other[key].numpy())   # EMA decay 0.9: they differ
    assert f"select_best {rule}" in (out / "train.log").read_text()


def test_evaluate_only_needs_only_validation_data(tmp_path, image_data, capsys):
    train_root, val_root = image_data
    code = _run(tiny_config(tmp_path, train_root, val_root, epochs=1))
    assert code == 0
    weights = str(tmp_path / "out" / "best.pdckpt")
    cfg = load_config(tiny_config(tmp_path, str(tmp_path / "no_such_train_dir"), val_root,
                                  output_dir=str(tmp_path / "eval")))
    returned = evaluate_only(cfg, weights)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert returned == result
    assert result["num_samples"] == 9 and result["weights"] == os.path.abspath(weights)
    assert 0 <= result["top1"] <= result["top5"] <= 100
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("eval ")]
    assert len(lines) == 1 and f"top1 {result['top1']:.3f}" in lines[0]


def test_evaluate_only_lists_skipped_validation_images(tmp_path, image_data):
    import shutil
    train_root, val_root = image_data
    code = _run(tiny_config(tmp_path, train_root, val_root, epochs=1))
    assert code == 0
    val_copy = tmp_path / "val"
    shutil.copytree(val_root, val_copy)
    corrupt = val_copy / "class_1" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = load_config(tiny_config(tmp_path, train_root, str(val_copy), output_dir=str(tmp_path / "eval"),
                                  data__val__skip_bad_images=True))
    assert evaluate_only(cfg, str(tmp_path / "out" / "best.pdckpt"))["num_samples"] == 10
    assert (tmp_path / "eval" / "bad_images_val.txt").read_text().splitlines() == [str(corrupt)]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["num_samples"] == 10


def test_unwritable_output_dir_and_full_disk_fail_before_training(tmp_path, image_data, monkeypatch):
    train_root, val_root = image_data
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PasslError, match="not writable"):
        _run(tiny_config(tmp_path, train_root, val_root, output_dir=str(blocker / "out")))

    class Usage:
        free = 1 << 20
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(PasslError, match="free"):
        _run(tiny_config(tmp_path, train_root, val_root))
    assert not any(p.endswith(".pdckpt") for p in os.listdir(tmp_path / "out"))


def test_resume_without_checkpoint_says_so(tmp_path, image_data):
    train_root, val_root = image_data
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _run(tiny_config(tmp_path, train_root, val_root), resume="auto")


def test_gradient_accumulation_matches_the_larger_batch(tmp_path, image_data):
    """batch 2 x 2 accumulation steps == batch 4 (same global batch, nothing random)."""
    train_root, val_root = image_data
    finals = []
    for batch, accum in ((4, 1), (2, 2)):
        run_dir = tmp_path / f"b{batch}"
        run_dir.mkdir()
        run, code = _fit(tiny_config(run_dir, train_root, None, augment=False, epochs=1,
                                     data__train__batch_size=batch, train__accum_steps=accum,
                                     train__grad_clip=100.0, optimizer__epsilon=1.0))  # eps 1: Adam sees the gradient scale
        assert code == 0 and run.global_batch == 4 and run.progress.global_step == 3
        finals.append({k: v.numpy() for k, v in run.raw_model.state_dict().items()})
    for key in finals[0]:
        np.testing.assert_allclose(finals[1][key], finals[0][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_skipped_bad_images_are_counted_and_listed(tmp_path, image_data, caplog):
    import shutil
    train_root, val_root = image_data
    train_copy = str(tmp_path / "train")
    shutil.copytree(train_root, train_copy)
    corrupt = os.path.join(train_copy, sorted(os.listdir(train_copy))[0], "broken.png")
    with open(corrupt, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = tiny_config(tmp_path, train_copy, val_root, epochs=1, data__train__skip_bad_images=True)
    code = _run(cfg)
    assert code == 0
    listing = tmp_path / "out" / "bad_images_train.txt"
    assert listing.read_text().splitlines() == [corrupt]
    assert "1 undecodable train image(s) were skipped" in (tmp_path / "out" / "train.log").read_text()
    for workers in (0, 2):   # the error reaches the trainer from this thread and from worker processes
        with pytest.raises(PasslError, match="broken.png"):
            _run(tiny_config(tmp_path, train_copy, val_root, epochs=1, output_dir=str(tmp_path / f"strict{workers}"),
                             data__train__num_workers=workers))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts processes through /proc")
def test_loader_workers_do_not_outlive_their_epoch(tmp_path, image_data):
    train_root, val_root = image_data
    before = child_processes()
    code = _run(tiny_config(tmp_path, train_root, val_root, epochs=2, data__train__num_workers=2,
                            data__val__num_workers=2))
    assert code == 0
    assert child_processes() - before == set()


def test_a_mid_epoch_resume_on_another_training_set_is_refused(tmp_path, image_data, monkeypatch):
    """Stopped 1 step into epoch 1, then the training folder gains images: the position in the epoch would
    mean other images, so the resume stops with the fix and changes nothing; on the same data it resumes."""
    import shutil
    train_root, val_root = image_data
    grown = tmp_path / "train"
    shutil.copytree(train_root, grown)
    cfg_path = tiny_config(tmp_path, str(grown), val_root, epochs=2)
    original = OptimizerStep.step

    def step_then_interrupt(self, lr):
        original(self, lr)
        os.kill(os.getpid(), signal.SIGINT)
    with monkeypatch.context() as patch:
        patch.setattr(OptimizerStep, "step", step_then_interrupt)
        assert _run(cfg_path) == 130
    stopped = load_file(str(tmp_path / "out" / "latest.pdckpt"))
    assert (stopped["epoch"], stopped["batch"], stopped["sampler"]["num_samples"]) == (0, 1, 12)
    shutil.copy(grown / "class_0" / "img_0.png", grown / "class_0" / "img_9.png")
    with pytest.raises(CheckpointError, match=r"latest.pdckpt stopped mid-epoch .1 batches into epoch 1. on a training "
                                              r"set of 12 images, but data.train.dataset now has 13"):
        _run(cfg_path, resume="auto")
    os.remove(grown / "class_0" / "img_9.png")
    assert _run(cfg_path, resume="auto") == 0


def _nan_at(calls_with_nan, monkeypatch):
    """Make the loss of the given micro-batches (1-based call counts) NaN."""
    build_loss = passl.build_loss

    def build_loss_with_nan(cfg):
        real, calls = build_loss(cfg), [0]

        def loss_fn(outputs, batch):
            out = real(outputs, batch)
            calls[0] += 1
            if calls[0] in calls_with_nan:
                out["loss"] = out["loss"] * float("nan")
            return out
        return loss_fn
    monkeypatch.setattr(passl, "build_loss", build_loss_with_nan)


def _with_scaler(monkeypatch):
    """float16 loss scaling as on a GPU: the run's AmpSettings get a scaler that skips non-finite steps."""
    from amp_helpers import SkippingScaler
    from passl.engine import setup
    real = setup.resolve_amp

    def resolve_amp(amp_cfg, device, **kwargs):
        amp = real(amp_cfg, device, **kwargs)
        amp.scaler = SkippingScaler()
        return amp
    monkeypatch.setattr(setup, "resolve_amp", resolve_amp)


def test_under_a_loss_scaler_a_non_finite_step_is_skipped_counted_and_logged(tmp_path, image_data, monkeypatch,
                                                                             capsys):
    train_root, val_root = image_data
    _nan_at({5}, monkeypatch)                        # global step 4: epoch 2, second batch
    _with_scaler(monkeypatch)
    out = tmp_path / "out"
    assert _run(tiny_config(tmp_path, train_root, val_root, epochs=3)) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 step(s): non-finite" in printed and "error" not in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 0]
    latest = load_file(str(out / "latest.pdckpt"))
    assert latest["global_step"] == 9 and all(np.isfinite(v.numpy()).all() for v in latest["model"].values())


def test_under_a_loss_scaler_consecutive_non_finite_steps_stop_the_run(tmp_path, image_data, monkeypatch, capsys):
    train_root, val_root = image_data
    _nan_at({5, 6}, monkeypatch)                     # global steps 4 and 5
    _with_scaler(monkeypatch)
    out = tmp_path / "out"
    assert _run(tiny_config(tmp_path, train_root, val_root, epochs=3, amp={"max_nonfinite_steps": 2})) == 1
    assert "NaN or infinite in 2 consecutive steps up to global step 5" in capsys.readouterr().out
    assert load_file(str(out / "latest.pdckpt"))["global_step"] == 3      # the last good checkpoint, kept


HAS_GPU = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="float16 and bfloat16 training steps run only on a CUDA device")
@pytest.mark.parametrize("level", ["O1", "O2"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_training_on_a_gpu_trains_checkpoints_float32_and_resumes(tmp_path, image_data, level, dtype):
    """The whole GPU path with the BatchNorm stem: 2 epochs under AMP, finite losses, a float32 checkpoint,
    and a resume for a third epoch at the same level."""
    if dtype == "bfloat16" and not paddle.amp.is_bfloat16_supported():
        pytest.skip("this GPU has no bfloat16 (compute capability 8.0 or newer)")
    train_root, val_root = image_data
    amp = {"enable": True, "level": level, "dtype": dtype}
    out = tmp_path / "out"
    assert _run(tiny_config(tmp_path, train_root, val_root, device="gpu", model__stem="pe4_2", amp=amp)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(np.isfinite(r["train_loss"]) for r in records)
    latest = load_file(str(out / "latest.pdckpt"))
    assert all(str(v.dtype) in ("paddle.float32", "float32") for k, v in latest["model"].items()
               if "_mean" not in k and "_variance" not in k)
    again = tiny_config(tmp_path, train_root, val_root, device="gpu", model__stem="pe4_2", amp=amp, epochs=3)
    assert _run(again, resume="auto") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and np.isfinite(records[-1]["train_loss"])
