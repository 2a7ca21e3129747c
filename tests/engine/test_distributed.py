"""Two CPU processes under paddle.distributed.launch (gloo over loopback).

- training ends with identical weights on both ranks, and matches one process with the same
  global batch when nothing random differs (no augmentation, no MixToken, no drop path, no BN);
- evaluation on 9 images (not a multiple of 2 processes x batch 4) gives exactly the numbers of
  one process.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from engine_helpers import tiny_config

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
        cfg = tiny_config(run, train_root, val_root, augment=False, epochs=2, data__train__batch_size=batch)
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


def test_evaluation_is_exact_across_process_counts(tmp_path, image_data):
    train_root, val_root = image_data
    run = tmp_path / "train"
    run.mkdir()
    _launch(1, ["train", tiny_config(run, train_root, val_root, epochs=1), str(run)], run / "log")
    weights = str(run / "out" / "latest.pdckpt")
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        out.mkdir()
        cfg = tiny_config(out, train_root, val_root, output_dir=str(out / "out"))
        _launch(nproc, ["eval", cfg, str(out), weights], out / "log")
        results[nproc] = [json.load(open(out / f"eval_rank{r}.json")) for r in range(nproc)]
    assert results[1][0]["num_samples"] == 9
    assert results[2][0] == results[2][1] == results[1][0]


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
