"""Every tool that writes, pointed at a read-only folder, stops before its work with one line naming the
folder and the option that chose it; the folder's files stay as they were.

The folder is made read-only by a read-only bind mount in a private mount namespace (``unshare -m``), so
the test also holds for root, which ignores file permissions; without that, a non-root user gets a
chmod 555 folder, and root without mount namespaces skips with the reason."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "engine"))
from engine_helpers import make_image_folder, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow


def _namespaces_work():
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return done.returncode == 0


NAMESPACES = _namespaces_work()


def _run_read_only(folder, argv):
    """Run ``argv`` (a tools/ script and its arguments) with ``folder`` read-only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    command = [sys.executable, os.path.join(ROOT, "tools", argv[0]), *argv[1:]]
    if NAMESPACES:
        command = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder), *command]
    elif os.geteuid() != 0:
        os.chmod(folder, 0o555)
    else:
        pytest.skip("running as root without mount namespaces: no way to make a folder read-only for root")
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    finally:
        os.chmod(folder, 0o755)


def _files(folder):
    out = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(directory, name), "rb") as f:
                out[os.path.relpath(os.path.join(directory, name), folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny config, images, label maps, LV-ViT weights and CNN weights, all outside the read-only folder."""
    import paddle

    import passl
    from passl.annotate import SmallCNN
    from passl.config import load_config
    base = tmp_path_factory.mktemp("inputs")
    train, val = make_image_folder(base / "train", per_class=2), make_image_folder(base / "val", per_class=1, seed=1)
    (base / "cfg").mkdir()
    config = tiny_config(base / "cfg", train, val, epochs=1)
    paddle.seed(0)
    paddle.save(passl.build_model(load_config(config)["model"]).state_dict(), str(base / "lvvit.pdparams"))
    paddle.save(SmallCNN(num_classes=3, width=4).state_dict(), str(base / "cnn.pdparams"))
    for directory, _, names in os.walk(train):
        for name in names:
            rel = os.path.relpath(os.path.join(directory, os.path.splitext(name)[0]), train)
            os.makedirs(base / "maps" / os.path.dirname(rel), exist_ok=True)
            np.save(base / "maps" / (rel + ".npy"), np.zeros((2, 3, 2, 2), np.float16))
    return {"base": base, "config": config, "train": train}


def _cases(inputs, ro):
    b = inputs["base"]
    return {
        "train output_dir": (["train.py", "-c", inputs["config"], "-o", f"output_dir={ro / 'run'}"],
                             f"output_dir {ro / 'run'} is not writable (Read-only file system); choose another "
                             "folder with -o output_dir=..."),
        "evaluate-only output_dir": (["train.py", "-c", inputs["config"], "--load", str(b / "lvvit.pdparams"),
                                      "--evaluate-only", "-o", f"output_dir={ro / 'eval'}"],
                                     f"output_dir {ro / 'eval'} is not writable"),
        "export_model": (["export_model.py", "-c", inputs["config"], "--load", str(b / "lvvit.pdparams"),
                          "--out", str(ro / "export")], f"--out {ro / 'export'} is not writable"),
        "convert_labels packed": (["convert_labels.py", "--src", str(b / "maps"), "--src-format", "npy", "--to",
                                   "packed", "--out", str(ro / "packed"), "--no-progress"],
                                  f"--out {ro / 'packed'} is not writable"),
        "convert_labels npy": (["convert_labels.py", "--src", str(b / "maps"), "--src-format", "npy", "--to", "npy",
                                "--out", str(ro / "npy"), "--no-progress"], f"--out {ro / 'npy'} is not writable"),
        "convert_weights": (["convert_weights.py", "--src", str(b / "lvvit.pdparams"), "--dst", str(ro / "w.safetensors")],
                            f"--dst {ro} is not writable"),
        "generate_labels": (["generate_labels.py", "--images", inputs["train"], "--out", str(ro / "labels"), "--arch",
                             "small_cnn", "--num-classes", "3", "--width", "4", "--weights", str(b / "cnn.pdparams"),
                             "--image-size", "32", "32", "--no-progress"], f"--out {ro / 'labels'} is not writable"),
        "inspect_labels --out": (["inspect_labels.py", "-c", inputs["config"], "--index", "0", "--out",
                                  str(ro / "s.npz")], f"--out {ro} is not writable"),
        "inspect_labels --png": (["inspect_labels.py", "-c", inputs["config"], "--index", "0", "--out",
                                  str(b / "s.npz"), "--png", str(ro / "s.png")], f"--png {ro} is not writable"),
        "make_example": (["make_example.py", "--out", str(ro / "digits"), "--no-progress"],
                         f"--out {ro} is not writable"),
        "demo": (["demo.py", "--out", str(ro / "demo"), "--data", str(b / "digits"), "--no-progress"],
                 f"--out {ro / 'demo'} is not writable"),
    }


CASES = ["train output_dir", "evaluate-only output_dir", "export_model", "convert_labels packed", "convert_labels npy",
         "convert_weights", "generate_labels", "inspect_labels --out", "inspect_labels --png", "make_example", "demo"]


@pytest.mark.parametrize("case", CASES)
def test_writing_into_a_read_only_folder_stops_in_one_line(tmp_path, inputs, case):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("a file the user had")
    argv, message = _cases(inputs, ro)[case]
    before = _files(ro)
    done = _run_read_only(ro, argv)
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert errors[0].startswith(f"error: {message}"), errors[0]
    assert _files(ro) == before
