"""The digit-scene example builder: layout, image format, meta boxes, determinism, split, re-runs."""
import hashlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from passl.example import scenes
from passl.example.scenes import build_digit_scenes, render_scene
from passl.errors import DataError

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
W, H = 80, 64


def build(out_dir, **kwargs):
    kwargs.setdefault("train_per_class", 3)
    kwargs.setdefault("val_per_class", 2)
    kwargs.setdefault("image_size", (W, H))
    return build_digit_scenes(str(out_dir), log=lambda msg: None, progress=False, **kwargs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes") / "digit_scenes"
    build(out, seed=0)
    with open(out / "meta.json", encoding="utf-8") as f:
        return out, json.load(f)


def tree_digest(root):
    """{relative path: sha1} of every file under root."""
    digest = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return digest


def test_layout_and_class_order(dataset):
    out, meta = dataset
    assert (out / "classes.txt").read_text(encoding="utf-8").split("\n")[:-1] == NAMES
    for split, per_class in (("train", 3), ("val", 2)):
        class_dirs = sorted(os.listdir(out / split))
        assert len(class_dirs) == 10
        # Sorted folder order is the class index, and each folder is named after its class.
        for index, class_dir in enumerate(class_dirs):
            assert class_dir == f"{index}_{NAMES[index]}"
            files = sorted(os.listdir(out / split / class_dir))
            assert len(files) == per_class and all(name.endswith(".jpg") for name in files)
    assert meta["counts"] == {"train": 30, "val": 20}
    assert sorted(os.listdir(out)) == ["classes.txt", "meta.json", "train", "val"]


def test_images_are_rgb_jpeg_of_the_stated_size(dataset):
    out, meta = dataset
    for record in meta["images"]:
        with Image.open(out / record["file"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (W, H)
            assert np.asarray(image).std() > 5  # not a blank frame


def test_meta_boxes_and_classes(dataset):
    out, meta = dataset
    from sklearn.datasets import load_digits
    true_labels = load_digits().target
    for record in meta["images"]:
        split, class_dir, _ = record["file"].split("/")
        label = NAMES.index(class_dir.split("_", 1)[1])
        assert record["split"] == split and record["label"] == label
        main, distractors = record["digits"][0], record["digits"][1:]
        assert main["main"] and main["class"] == label and not any(d["main"] for d in distractors)
        assert 1 <= len(distractors) <= 3
        classes = [d["class"] for d in distractors]
        assert label not in classes and len(set(classes)) == len(classes)
        for digit in record["digits"]:
            x0, y0, x1, y1 = digit["box"]
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            # The recorded class is the real label of the sklearn digit that was drawn.
            assert true_labels[digit["source"]] == digit["class"]
        assert 28 <= main["box"][3] - main["box"][1] <= 40
        for d in distractors:
            assert 12 <= d["box"][3] - d["box"][1] <= 20
            # A distractor is never hidden under the main digit: most of its box lies outside.
            ix = min(d["box"][2], main["box"][2]) - max(d["box"][0], main["box"][0])
            iy = min(d["box"][3], main["box"][3]) - max(d["box"][1], main["box"][1])
            inside = max(ix, 0) * max(iy, 0)
            area = (d["box"][2] - d["box"][0]) * (d["box"][3] - d["box"][1])
            assert inside <= 0.5 * area


def test_main_digit_is_drawn_exactly_in_its_box():
    # Blank sources draw nothing; a solid-ink main source must change the scene inside its box only,
    # to one flat colour. Same rng seed for both renders, so everything else is identical.
    blank = np.zeros((20, 8, 8), np.float32)
    inked = blank.copy()
    inked[0] = 1.0
    pools = [np.arange(20)] * 10
    plain, _ = render_scene(np.random.default_rng(5), blank, 0, 3, pools, W, H)
    drawn, digits = render_scene(np.random.default_rng(5), inked, 0, 3, pools, W, H)
    x0, y0, x1, y1 = digits[0]["box"]
    changed = np.any(plain != drawn, axis=2)
    mask = np.zeros_like(changed)
    mask[y0:y1, x0:x1] = True
    assert np.array_equal(changed & ~mask, np.zeros_like(changed))
    inside = drawn[y0:y1, x0:x1].reshape(-1, 3)
    assert np.all(inside == inside[0]) and changed[y0:y1, x0:x1].mean() > 0.9


def test_train_and_val_use_disjoint_source_digits(dataset):
    _, meta = dataset
    sources = {"train": set(), "val": set()}
    for record in meta["images"]:
        sources[record["split"]].update(d["source"] for d in record["digits"])
    assert sources["train"] and sources["val"] and not sources["train"] & sources["val"]
    assert meta["source_digits"]["train"] + meta["source_digits"]["val"] == 1797


def test_deterministic_for_a_seed_and_different_for_another(dataset, tmp_path):
    out, _ = dataset
    build(tmp_path / "again", seed=0)
    build(tmp_path / "other", seed=1)
    first, again, other = tree_digest(out), tree_digest(tmp_path / "again"), tree_digest(tmp_path / "other")
    assert first == again
    images = [path for path in first if path.endswith(".jpg")]
    assert sum(first[path] != other[path] for path in images) == len(images)


def test_more_images_keep_the_existing_ones(dataset, tmp_path):
    out, _ = dataset
    build(tmp_path / "bigger", seed=0, train_per_class=4)
    small, bigger = tree_digest(out), tree_digest(tmp_path / "bigger")
    assert all(bigger[path] == digest for path, digest in small.items() if path.endswith(".jpg"))


def test_existing_dataset_is_kept_replaced_or_refused(tmp_path):
    out = tmp_path / "digit_scenes"
    build(out, seed=0)
    stamp = os.stat(out / "meta.json").st_mtime_ns
    assert build(out, seed=0)["skipped"] is True
    assert os.stat(out / "meta.json").st_mtime_ns == stamp
    with pytest.raises(DataError, match=str(out)) as err:
        build(out, seed=1)
    assert "force" in str(err.value) and "seed 0" in str(err.value)
    assert os.stat(out / "meta.json").st_mtime_ns == stamp
    summary = build(out, seed=1, force=True)
    assert summary["skipped"] is False
    assert json.loads((out / "meta.json").read_text())["params"]["seed"] == 1
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp folders left


def test_missing_images_are_not_the_same_dataset(tmp_path):
    out = tmp_path / "digit_scenes"
    build(out, seed=0)
    os.remove(out / "val" / "0_zero" / "0_zero_0000.jpg")
    with pytest.raises(DataError, match="missing"):
        build(out, seed=0)
    build(out, seed=0, force=True)
    assert (out / "val" / "0_zero" / "0_zero_0000.jpg").is_file()


def test_force_never_replaces_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a digit_scenes dataset"):
        build(tmp_path, seed=0, force=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_interrupted_build_leaves_the_old_dataset_alone(tmp_path, monkeypatch):
    out = tmp_path / "digit_scenes"
    build(out, seed=0)
    before = tree_digest(out)
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return render_scene(*args, **kwargs)

    monkeypatch.setattr(scenes, "render_scene", failing_render)
    with pytest.raises(KeyboardInterrupt):
        build(out, seed=1, force=True)
    assert tree_digest(out) == before
    assert sorted(os.listdir(tmp_path)) == ["digit_scenes"]


def test_builds_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the example must not use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    import sklearn.datasets
    monkeypatch.setattr(sklearn.datasets, "fetch_openml", no_network)
    assert build(tmp_path / "offline", train_per_class=1, val_per_class=1)["train"] == 10


def test_command_line(tmp_path, repo_root):
    out = tmp_path / "digit_scenes"
    cmd = [sys.executable, os.path.join(repo_root, "tools", "make_example.py"), "--out", str(out),
           "--train-per-class", "1", "--val-per-class", "1", "--image-size", "64", "48", "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "wrote 10 train + 10 val" in first.stdout and "64x48" in first.stdout
    with Image.open(out / "train" / "5_five" / "5_five_0000.jpg") as image:
        assert image.size == (64, 48)
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and "already holds" in again.stdout
    other = subprocess.run(cmd + ["--seed", "3"], capture_output=True, text=True)
    assert other.returncode == 2 and str(out) in other.stderr and "Traceback" not in other.stderr
