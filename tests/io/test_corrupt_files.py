"""Damaged files: every reader turns truncation and garbage into a CheckpointError naming the file, never
another exception. Each format is cut at many lengths, has bytes overwritten at seeded positions, and is
replaced by zeros, by random bytes and by itself with bytes appended; an overwritten byte inside the
data may leave a readable file, anything else must be refused. Also through the tools: --load of a
truncated or empty .pdparams ends in one line naming it."""
import os
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

from passl.errors import CheckpointError
from passl.io import read_state, save_pth, write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "io", "data")
ARRAYS = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16),
          "c": np.array([1, 2], np.int64)}


def _originals(directory):
    """{name: path} of one small valid file per format and layout."""
    tensors = {k: paddle.to_tensor(v) for k, v in ARRAYS.items()}
    files = {"state dict.pdparams": directory / "w.pdparams", "checkpoint.pdckpt": directory / "c.pdckpt",
             "zip.pth": directory / "w.pth", "safetensors": directory / "w.safetensors",
             "npy": directory / "m.npy", "PASSL.pd": directory / "old.pd", "legacy.pth": directory / "legacy.pth",
             "torch-made.pth": directory / "torch.pth"}
    paddle.save(tensors, str(files["state dict.pdparams"]))
    paddle.save({"model": tensors, "epoch": 3, "rng": {"paddle": paddle.get_rng_state()}, "best": None},
                str(files["checkpoint.pdckpt"]))
    save_pth(ARRAYS, files["zip.pth"])
    write_safetensors(ARRAYS, files["safetensors"], {"variant": "x"})
    np.save(files["npy"], np.zeros((2, 5, 3, 3), np.float16))
    with open(files["PASSL.pd"], "wb") as f:
        pickle.dump({"epoch": 1, "state_dict": ARRAYS}, f, protocol=2)
    shutil.copy(os.path.join(DATA, "torch_made_legacy.pth"), files["legacy.pth"])
    shutil.copy(os.path.join(DATA, "torch_made.pth"), files["torch-made.pth"])
    return {name: str(path) for name, path in files.items()}


def _damaged(data, seed):
    """(label, bytes, may_still_read) variants of ``data``."""
    rng = random.Random(seed)
    cuts = sorted({0, 1, 2, 4, 8, 9, 16, 64, len(data) // 3, len(data) // 2, len(data) - 8, len(data) - 1})
    for n in cuts:
        if 0 <= n < len(data):
            yield f"cut at {n}", data[:n], False
    for _ in range(80):
        changed = bytearray(data)
        position = rng.randrange(len(data))
        changed[position] = (changed[position] + rng.randrange(1, 256)) % 256
        yield f"byte {position} changed", bytes(changed), True
    yield "zeros", bytes(len(data)), False
    yield "random bytes", bytes(rng.randrange(256) for _ in range(len(data))), False
    yield "bytes appended", data + b"garbage", True


@pytest.mark.parametrize("kind", ["state dict.pdparams", "checkpoint.pdckpt", "zip.pth", "safetensors", "npy",
                                  "PASSL.pd", "legacy.pth", "torch-made.pth"])
def test_damaged_files_are_refused_with_their_name(tmp_path, kind):
    original = _originals(tmp_path)[kind]
    suffix = original[original.index(".", len(str(tmp_path)) + 1):]
    with open(original, "rb") as f:
        data = f.read()
    read_state(original)                                  # the undamaged file reads
    refused = 0
    for label, blob, may_read in _damaged(data, seed=len(kind)):
        path = str(tmp_path / f"damaged{suffix}")
        with open(path, "wb") as f:
            f.write(blob)
        try:
            read_state(path)
        except CheckpointError as e:
            assert path in str(e), (label, str(e))
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point: nothing but CheckpointError
            pytest.fail(f"{kind}, {label}: {type(e).__name__}: {e}")
        assert may_read, f"{kind}, {label}: read without complaint"
    assert refused >= 15                                   # every cut, zeros and random bytes at least


@pytest.mark.slow
@pytest.mark.parametrize("cut", [0, 100], ids=["empty", "truncated"])
def test_load_of_a_truncated_pdparams_ends_in_one_line(tmp_path, cut):
    paddle.save({k: paddle.to_tensor(v) for k, v in ARRAYS.items()}, str(tmp_path / "full.pdparams"))
    with open(tmp_path / "full.pdparams", "rb") as f:
        data = f.read()
    weights = tmp_path / "w.pdparams"
    weights.write_bytes(data[:cut])
    config = os.path.join(ROOT, "configs", "example", "lvvit_digits_tl.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", config, "--load", str(weights),
                           "--evaluate-only", "-o", f"output_dir={tmp_path / 'eval'}", "-o", "device=cpu"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(weights) in errors[0] and "Traceback" not in done.stderr
    assert weights.read_bytes() == data[:cut]
