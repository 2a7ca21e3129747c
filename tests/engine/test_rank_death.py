"""A rank killed without a word (SIGKILL, as the out-of-memory killer does) under paddle.distributed.launch,
2 gloo CPU processes: what the surviving rank's log says, which README "Troubleshooting" quotes.

- killed while the survivor heads for a collective that Python makes (the flags synced every log interval,
  evaluation, the end of an epoch): the survivor stops with one line, no traceback, naming the lost contact;
- killed while the survivor is inside the gradient all-reduce of its backward pass (run by Paddle's C++
  threads): gloo aborts the survivor before Python sees an error, and its log shows gloo's own words.
Either way the launcher stops with a non-zero status within seconds, not at a timeout."""
import os
import subprocess
import sys
import time

import pytest
from engine_helpers import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "rank_death_worker.py")

pytestmark = pytest.mark.slow


def _launch_and_kill(tmp_path, image_data, kill_at):
    train_root, val_root = image_data
    # 6 steps per epoch; log_interval 2: the flags are synced after global step 2
    cfg = tiny_config(tmp_path, train_root, val_root, epochs=3, data__train__batch_size=1)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "KILL_AT": str(kill_at)}
    for key in [k for k in env if k.startswith(("PADDLE_", "FLAGS_selected"))]:
        del env[key]
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                           str(tmp_path / "log"), WORKER, "-c", cfg], env=env, capture_output=True, text=True,
                          timeout=300)
    survivor = (tmp_path / "log" / "workerlog.0").read_text()
    killed = (tmp_path / "log" / "workerlog.1").read_text()
    return done, survivor, killed, time.time() - started


def test_a_rank_killed_before_a_python_collective_leaves_one_line_on_the_survivor(tmp_path, image_data):
    done, survivor, killed, seconds = _launch_and_kill(tmp_path, image_data, kill_at=1)
    assert done.returncode != 0 and seconds < 120
    errors = [line for line in survivor.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in survivor, survivor[-3000:]
    assert errors[0].startswith("error: rank 0 of 2: lost contact with the other processes (RuntimeError: ")
    assert errors[0].endswith("another rank probably died first - its error is in the launcher's log directory "
                              "(log/workerlog.<rank> by default)")
    assert "error" not in killed.lower() and "Traceback" not in killed      # SIGKILL: the dead rank says nothing


def test_a_rank_killed_during_the_gradient_all_reduce_aborts_the_survivor_in_gloo(tmp_path, image_data):
    done, survivor, killed, seconds = _launch_and_kill(tmp_path, image_data, kill_at=0)
    assert done.returncode != 0 and seconds < 120
    assert "terminate called after throwing an instance of 'gloo::" in survivor, survivor[-3000:]
    assert "lost contact" not in survivor
    assert "Traceback" not in killed
