"""tools/train.py as a user runs it: config errors exit 2 with the key named, a dumped config
reproduces the run, and a tiny run trains, resumes and evaluates from the command line."""
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "engine"))
from engine_helpers import make_image_folder, tiny_config  # noqa: E402

TRAIN = os.path.join(ROOT, "tools", "train.py")
TINY = os.path.join(ROOT, "configs", "lvvit", "lvvit_tiny.yaml")


def _train_py(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_bad_type_fails_fast_naming_the_key():
    done = _train_py("-c", TINY, "-o", "epochs=oops")
    assert done.returncode == 2
    assert "epochs" in done.stderr and "integer" in done.stderr and "oops" in done.stderr
    assert "Traceback" not in done.stderr


def test_misspelt_key_suggests_the_right_one():
    done = _train_py("-c", TINY, "-o", "epohcs=3")
    assert done.returncode == 2
    assert "epohcs" in done.stderr and "Did you mean: epochs" in done.stderr


def test_dumped_config_prints_back_identically(tmp_path):
    from passl.config import dump_config, load_config
    resolved = load_config(TINY, ["epochs=7", "train.grad_clip=1.0", "data.train.batch_size=96"])
    dumped = dump_config(resolved, str(tmp_path / "config.yaml"))
    done = _train_py("-c", dumped, "--print-config")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout) == resolved
    original = _train_py("-c", TINY, "-o", "epochs=7", "-o", "train.grad_clip=1.0", "-o", "data.train.batch_size=96",
                         "--print-config")
    assert original.stdout == done.stdout


@pytest.mark.slow
def test_train_resume_and_evaluate_from_the_command_line(tmp_path):
    train_root = make_image_folder(tmp_path / "train", per_class=4)
    val_root = make_image_folder(tmp_path / "val", per_class=3, seed=1)
    cfg = tiny_config(tmp_path, train_root, val_root, epochs=1)
    out = tmp_path / "out"
    first = _train_py("-c", cfg)
    assert first.returncode == 0, first.stderr
    assert "done: 1 epochs" in first.stdout
    # the run's own config.yaml reproduces it; resuming a finished run to 2 epochs continues it
    again = _train_py("-c", str(out / "config.yaml"), "-o", "epochs=2", "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout and "epoch 2" in again.stdout
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    evaluated = _train_py("-c", str(out / "config.yaml"), "--load", str(out / "best.pdckpt"), "--evaluate-only",
                          "-o", f"output_dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr
    assert [x for x in evaluated.stdout.splitlines() if x.startswith("eval ")]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["num_samples"] == 9
