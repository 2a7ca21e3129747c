"""tools/train.py against a new user's mistakes and a machine's faults, as a user runs it: each ends with
exit status 2 and one line naming the key, file or folder and the fix, and the files of the run that was
there before are byte for byte what they were. (The ranges of every key: tests/test_ranges.py.)"""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "engine"))
from engine_helpers import make_image_folder, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow
TRAIN = os.path.join(ROOT, "tools", "train.py")
# what a run may add to or change in its own folder when it starts and stops without training
LOG_FILES = re.compile(r"^(\.lock|train\.log|vdl/.*)$")


def _train_py(*args, limit=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}

    def small_files():   # a disk that fills up: writes beyond `limit` bytes fail (EFBIG) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env, preexec_fn=small_files if limit else None)


def _files(folder, skip=None):
    out = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(directory, name), folder)
            if skip is None or not skip.match(rel):
                with open(os.path.join(directory, name), "rb") as f:
                    out[rel] = f.read()
    return out


def _one_error(done):
    assert done.returncode == 2, (done.stdout[-3000:], done.stderr[-3000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0][len("error: "):]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run (config, images, output folder) to copy into each test."""
    base = tmp_path_factory.mktemp("finished")
    train, val = make_image_folder(base / "train", per_class=4), make_image_folder(base / "val", per_class=3, seed=1)
    config = tiny_config(base, train, val, epochs=1)
    done = _train_py("-c", config)
    assert done.returncode == 0, done.stderr
    return {"base": base, "train": train, "val": val, "config": config, "out": base / "out"}


@pytest.fixture
def run(tmp_path, finished):
    """A copy of the finished run in tmp_path/out, and a config pointing at it."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out, copy_function=shutil.copy2)
    config = tiny_config(tmp_path, finished["train"], finished["val"], epochs=1)
    return {**finished, "out": out, "config": config, "tmp": tmp_path}


BAD_VALUES = [
    ("epochs=0", "epochs: expected an integer >= 1, got 0 from -o epochs=0", True),
    ("epochs=-3", "epochs: expected an integer >= 1, got -3 from -o epochs=-3", False),
    ("data.val.batch_size=0", "data.val.batch_size: expected an integer >= 1, got 0 from -o data.val.batch_size=0",
     True),
    ("train.eval_interval=0", "train.eval_interval: expected an integer >= 1, got 0", False),
    ("train.log_interval=0", "train.log_interval: expected an integer >= 1, got 0", True),
    ("data.train.num_workers=-1", "data.train.num_workers: expected an integer >= 0", False),
    ("optimizer.lr=-0.001", "optimizer.lr: expected a number > 0, got -0.001", True),
    ("optimizer.grad_clip=1.0", "unknown key 'optimizer.grad_clip' in -o optimizer.grad_clip=1.0. The key "
                                "'grad_clip' exists as train.grad_clip; set that instead.", False),
    ("optimizer.multi_precision=true", "unknown key 'optimizer.multi_precision'", True),
]


@pytest.mark.parametrize("override,words,resume", BAD_VALUES,
                         ids=[f"{o}{' --resume' if r else ''}" for o, _, r in BAD_VALUES])
def test_bad_values_stop_before_the_existing_run_is_touched(run, override, words, resume):
    before = _files(run["out"])
    message = _one_error(_train_py("-c", run["config"], "-o", override, *(["--resume"] if resume else [])))
    assert message.startswith(words), message
    assert _files(run["out"]) == before                  # metrics.jsonl, config.yaml, checkpoints, even .lock


def test_resuming_a_finished_run_without_more_epochs_changes_nothing(run):
    before = _files(run["out"])
    message = _one_error(_train_py("-c", run["config"], "--resume"))
    assert message.startswith(f"--resume {run['out'] / 'latest.pdckpt'}: that run has finished 1 epochs and epochs "
                              "is 1; nothing is left to train. Set a larger epochs (e.g. -o epochs=11)")
    assert _files(run["out"], LOG_FILES) == {k: v for k, v in before.items() if not LOG_FILES.match(k)}


def test_a_fresh_run_over_a_finished_one_is_refused_and_overwrite_moves_it_aside(run):
    before = _files(run["out"])
    message = _one_error(_train_py("-c", run["config"]))
    assert message.startswith(f"output_dir {run['out']} holds a run (best.pdckpt, best_model.pdparams, "
                              "best_model.safetensors, epoch_0001.pdckpt and 2 more): continue it with --resume, or "
                              f"pass --overwrite to move it to {run['out']}.old-<time> and start anew"), message
    assert _files(run["out"]) == before
    done = _train_py("-c", run["config"], "--overwrite")
    assert done.returncode == 0, done.stderr
    moved = [p for p in os.listdir(run["tmp"]) if p.startswith("out.old-")]
    assert len(moved) == 1 and f"moved the earlier run in {run['out']} to {run['tmp'] / moved[0]}" in done.stdout
    assert _files(run["tmp"] / moved[0]) == before       # all of it, as it was
    lines = (run["out"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]   # the new run's own history
    message = _one_error(_train_py("-c", run["config"], "--overwrite", "--resume"))
    assert "--overwrite starts a new training run; it does not go with --resume" in message


def test_a_second_run_into_a_busy_output_dir_is_refused_and_a_killed_run_leaves_no_lock(run):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    long_run = subprocess.Popen([sys.executable, TRAIN, "-c", run["config"], "--resume", "-o", "epochs=100000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    try:
        deadline = time.time() + 120
        lock = run["out"] / ".lock"              # made by the run once it starts, removed by a clean release
        while f"pid {long_run.pid} " not in (lock.read_text() if lock.exists() else ""):   # it holds the folder
            assert time.time() < deadline and long_run.poll() is None
            time.sleep(0.2)
        for extra in ([], ["--resume", "-o", "epochs=300"], ["--overwrite"]):
            message = _one_error(_train_py("-c", run["config"], *extra))
            assert message.startswith(f"output_dir {run['out']} is in use by another training run (pid {long_run.pid} "), \
                message
            assert message.endswith("wait for it to end or stop it, or choose another output_dir")
        while len((run["out"] / "metrics.jsonl").read_text().splitlines()) < 3:    # it trained on a while
            assert time.time() < deadline and long_run.poll() is None
            time.sleep(0.2)
    finally:
        long_run.kill()                                  # SIGKILL: no handler, no cleanup
        long_run.wait()
    from passl.engine.checkpoint import load_file
    epochs = load_file(str(run["out"] / "latest.pdckpt"))["epoch"] + 1
    done = _train_py("-c", run["config"], "--resume", "-o", f"epochs={epochs}")
    assert done.returncode == 0, done.stderr             # the lock died with its holder
    assert f"done: {epochs} epochs" in done.stdout


def test_a_full_disk_while_checkpointing_keeps_every_checkpoint_and_says_what_is_needed(run):
    stale = run["out"] / ".latest.pdckpt.q1w2e3r4.tmp.pdckpt"       # a write killed earlier
    stale.write_bytes(b"x" * 1000)
    checkpoint = os.path.getsize(run["out"] / "latest.pdckpt")
    kept = re.compile(r"^(.*\.pdckpt|best_model\..*|metrics\.jsonl)$")
    before = {k: v for k, v in _files(run["out"]).items() if kept.match(k) and not k.startswith(".")}
    done = _train_py("-c", run["config"], "--resume", "-o", "epochs=2", limit=checkpoint // 2)
    message = _one_error(done)
    assert message.startswith(f"cannot write {run['out'] / 'epoch_0002.pdckpt'}: this process may write files of at "
                              "most "), message
    assert "(ulimit -f); it needs " in message and message.endswith(
        f"the run stopped without saving the checkpoint of epoch 2: {run['out'] / 'latest.pdckpt'}, saved before, is "
        "intact: continue from it with --resume")
    assert {k: v for k, v in _files(run["out"]).items() if kept.match(k) and not k.startswith(".")} == before
    assert not stale.exists() and "removed 1 temporary file(s) of an interrupted write" in done.stdout
    assert not [name for name in os.listdir(run["out"]) if ".tmp" in name]   # nothing half-written left behind
    done = _train_py("-c", run["config"], "--resume", "-o", "epochs=2")   # room again: it goes on from epoch 1
    assert done.returncode == 0, done.stderr
    assert [json.loads(x)["epoch"] for x in (run["out"] / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _val_without(run, missing):
    val = run["tmp"] / "val_missing"
    shutil.copytree(run["val"], val)
    shutil.rmtree(val / missing)
    return str(val)


def test_a_validation_folder_with_other_classes_stops_training(run):
    val = _val_without(run, "class_1")
    config = tiny_config(run["tmp"], run["train"], val, epochs=1, output_dir=str(run["tmp"] / "new"))
    message = _one_error(_train_py("-c", config))
    assert message == (f"data.val.dataset ({val}) has 2 classes and data.train.dataset ({run['train']}) 3: 1 missing "
                       "(class_1). Labels are positions in the class list, so top-1 would be wrong; make the class "
                       "folders match, or give both datasets the same class_names list (a class missing from the "
                       "validation set is then fine)")
    names = ["class_0", "class_1", "class_2"]
    config = tiny_config(run["tmp"], run["train"], val, epochs=1, output_dir=str(run["tmp"] / "named"),
                         data__train__dataset={"name": "ImageFolder", "root": run["train"], "class_names": names},
                         data__val__dataset={"name": "ImageFolder", "root": val, "class_names": names})
    done = _train_py("-c", config)
    assert done.returncode == 0, done.stderr


def test_evaluate_only_checks_the_classes_the_weights_record(run):
    val = _val_without(run, "class_1")
    config = tiny_config(run["tmp"], run["train"], val, output_dir=str(run["tmp"] / "eval"))
    checkpoint, weights = run["out"] / "latest.pdckpt", run["out"] / "best_model.pdparams"
    for path, words in ((checkpoint, f"has 2 classes and the training set recorded in {checkpoint} 3: 1 missing "
                                     "(class_1)."),
                        (run["out"] / "best_model.safetensors", "the training set recorded in"),
                        (weights, f"has 2 classes but the model has 3 outputs and {weights} does not record its "
                                  "class names")):
        message = _one_error(_train_py("-c", config, "--load", str(path), "--evaluate-only"))
        assert message.startswith(f"data.val.dataset ({val}) ") and words in message, message
        assert message.endswith("give data.val.dataset.class_names the training classes in training order (a class "
                                "with no images is then fine)")
    config = tiny_config(run["tmp"], run["train"], val, output_dir=str(run["tmp"] / "eval"),
                         data__val__dataset={"name": "ImageFolder", "root": val,
                                             "class_names": ["class_0", "class_1", "class_2"]})
    done = _train_py("-c", config, "--load", str(checkpoint), "--evaluate-only")
    assert done.returncode == 0, done.stderr
    assert json.loads((run["tmp"] / "eval" / "eval.json").read_text())["num_samples"] == 6
