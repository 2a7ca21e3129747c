"""tools/check_labels.py: the start-up check on demand, one line per outcome, the index training reuses."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check(images, labels, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "check_labels.py"), "-c",
           os.path.join(ROOT, "configs", "lvvit", "lvvit_tiny.yaml"), "-o", f"data.train.dataset.root={images}",
           "-o", f"data.train.label_store.root={labels}", "-o", "model.num_classes=10", "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_check_labels_reports_counts_and_bad_maps(tmp_path):
    images, labels = tmp_path / "img", tmp_path / "lab"
    for i, name in enumerate(["a/x", "a/y", "b/z"]):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (labels / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12)).save(images / f"{name}.JPEG")
        label_map = np.zeros((2, 5, 3, 3), np.float16)
        label_map[1] = i
        np.save(labels / f"{name}.npy", label_map)
        os.utime(labels / f"{name}.npy", (1_600_000_000, 1_600_000_000))
    first = check(images, labels)
    assert first.returncode == 0, first.stderr
    assert "3 images, 0 without a map; 3 maps read, 0 unchanged" in first.stdout
    assert "3 maps read" not in check(images, labels).stdout              # the index was kept
    assert "3 maps read" in check(images, labels, "--full").stdout
    bad = np.zeros((2, 5, 3, 3), np.float16)
    bad[1, 0, 0, 0] = 12
    np.save(labels / "b" / "z.npy", bad)
    done = check(images, labels)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert str(labels / "b" / "z.npy") in done.stderr and "outside 0..9" in done.stderr
