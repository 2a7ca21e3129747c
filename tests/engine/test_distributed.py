"""Two CPU processes under paddle.distributed.launch (gloo over loopback).

- with the BN-free stem and nothing random, training with dense_weight 0 (aux_head's output unused by
  the loss) ends with identical weights on both ranks and matches one process with the same global batch;
- with the real pe4_2 stem (BatchNorm): the ranks end with identical running statistics (averaged before
  every evaluation and checkpoint), the logged loss is the mean over both ranks' samples, a run stopped
  mid-epoch and resumed ends bit-identical to the uninterrupted one, resuming 2 processes onto 1 and 1
  onto 2 (another global batch) follows the same lr per epoch, and evaluation on 1 and 2 processes
  (9 images: not a multiple of 2 processes x batch 4) gives the same numbers.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from engine_helpers import make_image_folder, tiny_config

from passl.engine.checkpoint import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "dist_worker.py")

pytestmark = pytest.mark.slow


def _launch(nproc, args, log_dir, expect_ok=True):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith(("PADDLE_", "FLAGS_selected"))]:
        del env[key]
    if nproc == 1:
        cmd = [sys.executable, WORKER, *args]
    else:
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
               "--log_dir", str(log_dir), WORKER, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    logs = ""
    if os.path.isdir(log_dir):
        logs = "\n".join(open(os.path.join(log_dir, f)).read()[-3000:] for f in sorted(os.listdir(log_dir)))
    if not expect_ok:
        return done
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{logs}"
    return done


def _weights(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, image_data):
    train_root, val_root = image_data
    results = {}
    for nproc, batch in ((2, 2), (1, 4)):
        run = tmp_path / f"p{nproc}"
        run.mkdir()
        # dense_weight 0: aux_head's output reaches the loss only with weight 0 (the transfer recipe)
        cfg = tiny_config(run, train_root, val_root, augment=False, epochs=2, data__train__batch_size=batch,
                          loss={"name": "TokenLabelCrossEntropy", "dense_weight": 0.0})
        _launch(nproc, ["train", cfg, str(run)], run / "log")
        results[nproc] = [_weights(run / f"rank{r}.npz") for r in range(nproc)]
    rank0, rank1 = results[2]
    for key in rank0:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)     # ranks never drift apart
    single = results[1][0]
    for key in single:
        np.testing.assert_allclose(rank0[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
    print("max |2 processes - 1 process|:", max(np.abs(rank0[k] - single[k]).max() for k in single))
    assert os.path.exists(tmp_path / "p2" / "out" / "latest.pdckpt")
    assert len(open(tmp_path / "p2" / "out" / "metrics.jsonl").read().splitlines()) == 2   # rank 0 only


# ---------------------------------------------------------------------------------------------
# the real stem (BatchNorm), 3 steps per epoch with 2 processes x batch 2, 6 with 1 process

def _bn_config(directory, train_root, val_root, **overrides):
    """pe4_2 stem, augmentation, MixToken and drop path on, dense_weight 0; the lr neither scaled with the
    global batch nor changed within an epoch, so the lr of an epoch is the same at any cluster size."""
    return tiny_config(directory, train_root, val_root, epochs=4, data__train__batch_size=2,
                       model__stem="pe4_2", loss={"name": "TokenLabelCrossEntropy", "dense_weight": 0.0},
                       optimizer__reference_batch=0, lr_schedule__per_iteration=False, **overrides)


@pytest.fixture(scope="module")
def bn_images(tmp_path_factory):
    base = tmp_path_factory.mktemp("bn_images")
    return make_image_folder(base / "train", per_class=4), make_image_folder(base / "val", per_class=3, seed=1)


def _train(directory, train_root, val_root, nproc, *extra, expect_ok=True):
    """Train with _bn_config in ``directory`` (output in directory/out); returns the launcher's result."""
    directory.mkdir(exist_ok=True)
    cfg = _bn_config(directory, train_root, val_root)
    return _launch(nproc, ["train", cfg, str(directory), *extra], directory / "log", expect_ok=expect_ok)


def _epochs(directory):
    lines = (directory / "out" / "metrics.jsonl").read_text().splitlines()
    return {line["epoch"]: line for line in map(json.loads, lines)}


@pytest.fixture(scope="module")
def uninterrupted(bn_images, tmp_path_factory):
    """4 epochs on 2 processes without a stop."""
    directory = tmp_path_factory.mktemp("straight")
    _train(directory, *bn_images, 2)
    return directory


@pytest.fixture(scope="module")
def stopped(bn_images, tmp_path_factory):
    """The same run stopped on both ranks after global step 4 (1 of 3 steps into epoch 2)."""
    directory = tmp_path_factory.mktemp("stopped")
    done = _train(directory, *bn_images, 2, "--stop-after-step", "4", expect_ok=False)
    assert done.returncode != 0                                     # 130: interrupted, resumable
    return directory


def test_ranks_keep_one_set_of_bn_statistics_and_log_every_rank_s_loss(uninterrupted):
    rank0, rank1 = (_weights(uninterrupted / f"rank{r}.npz") for r in range(2))
    assert any(k.endswith("bn1._mean") for k in rank0) and any(k.startswith("ema/") for k in rank0)
    for key in rank0:                                               # BN statistics and EMA included
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    losses = [json.loads((uninterrupted / f"rank{r}_losses.json").read_text()) for r in range(2)]
    for epoch, line in _epochs(uninterrupted).items():
        own = [losses[r][str(epoch)] for r in range(2)]
        assert len(own[0]) == len(own[1]) == 3 and own[0] != own[1]   # each rank saw its own samples
        assert line["train_loss"] == pytest.approx(np.mean(own[0] + own[1]), rel=1e-6), epoch


def test_a_two_process_resume_ends_bit_identical(uninterrupted, stopped, bn_images, tmp_path):
    ckpt = load_file(str(stopped / "out" / "latest.pdckpt"))
    assert (ckpt["epoch"], ckpt["batch"], ckpt["global_step"]) == (1, 1, 4)
    assert len(ckpt["bn_by_rank"]) == 2                            # each rank's own statistics, for the resume
    resumed_dir = tmp_path / "resumed"
    _train(resumed_dir, *bn_images, 2, "--resume", str(stopped / "out" / "latest.pdckpt"))
    for r in range(2):
        want, got = _weights(uninterrupted / f"rank{r}.npz"), _weights(resumed_dir / f"rank{r}.npz")
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"rank {r}: {key}")
    straight, resumed = _epochs(uninterrupted), _epochs(resumed_dir)
    assert sorted(resumed) == [2, 3, 4]
    for epoch in (2, 3, 4):
        for key in ("lr", "val_top1", "ema_top1"):
            assert resumed[epoch][key] == straight[epoch][key], (epoch, key)


def test_resuming_on_another_cluster_size_follows_the_same_lr_curve(uninterrupted, stopped, bn_images, tmp_path):
    """2 processes x batch 2 -> 1 process (global batch 4 -> 2, 3 -> 6 steps per epoch) at the end of epoch 1,
    and that run's epoch 2 checkpoint back onto 2 processes: the lr of every epoch is the uninterrupted run's."""
    straight = {epoch: line["lr"] for epoch, line in _epochs(uninterrupted).items()}
    assert len(set(straight.values())) == 4                        # warm-up, then the cosine: 4 different
    onto_one = tmp_path / "onto_one"
    _train(onto_one, *bn_images, 1, "--resume", str(stopped / "out" / "epoch_0001.pdckpt"))
    assert {e: line["lr"] for e, line in _epochs(onto_one).items()} == {e: straight[e] for e in (2, 3, 4)}
    log = (onto_one / "out" / "train.log").read_text()
    assert "the global batch changed from 4 to 2" in log and "6 steps/epoch now" in log
    onto_two = tmp_path / "onto_two"
    _train(onto_two, *bn_images, 2, "--resume", str(onto_one / "out" / "epoch_0002.pdckpt"))
    assert {e: line["lr"] for e, line in _epochs(onto_two).items()} == {e: straight[e] for e in (3, 4)}
    assert "the global batch changed from 2 to 4" in (onto_two / "out" / "train.log").read_text()


def test_evaluation_is_exact_across_process_counts(uninterrupted, bn_images, tmp_path):
    """The uninterrupted run's last checkpoint, evaluated with 1 and 2 processes, scores what the run logged."""
    weights = str(uninterrupted / "out" / "epoch_0004.pdckpt")
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        out.mkdir()
        cfg = _bn_config(out, *bn_images, output_dir=str(out / "out"))
        _launch(nproc, ["eval", cfg, str(out), "--weights", weights], out / "log")
        results[nproc] = [json.load(open(out / f"eval_rank{r}.json")) for r in range(nproc)]
    assert results[1][0]["num_samples"] == 9
    assert results[2][0] == results[2][1] == results[1][0]
    logged = _epochs(uninterrupted)[4]
    which = results[1][0]["which"]
    assert results[1][0]["top1"] == logged["ema_top1" if which == "ema" else "val_top1"]


def test_images_skipped_on_any_rank_are_listed(tmp_path, image_data):
    """Round-robin evaluation deals the last of 10 validation images to rank 1 only; rank 0 lists it."""
    import shutil
    train_root, val_root = image_data
    val_copy = tmp_path / "val"
    shutil.copytree(val_root, val_copy)
    corrupt = val_copy / "class_2" / "z_broken.png"          # sorts last: position 9, rank 1's
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = tiny_config(tmp_path, train_root, str(val_copy), epochs=1, data__val__skip_bad_images=True)
    _launch(2, ["train", cfg, str(tmp_path)], tmp_path / "log")
    assert (tmp_path / "out" / "bad_images_val.txt").read_text().splitlines() == [str(corrupt)]
    assert "1 undecodable val image(s) were skipped" in (tmp_path / "out" / "train.log").read_text()


def test_a_dying_rank_stops_the_run_with_a_clear_error(tmp_path, image_data):
    train_root, val_root = image_data
    cfg = tiny_config(tmp_path, train_root, val_root, epochs=3)
    done = _launch(2, ["crash", cfg, str(tmp_path)], tmp_path / "log", expect_ok=False)
    assert done.returncode != 0
    rank1 = (tmp_path / "log" / "workerlog.1").read_text()
    assert "rank 1 of 2 failed: RuntimeError: simulated crash on rank 1" in rank1
    rank0 = (tmp_path / "log" / "workerlog.0").read_text()
    assert "lost contact with the other processes" in rank0 and "another rank probably died" in rank0
