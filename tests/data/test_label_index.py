"""The start-up label-map check and its index: what is reused, what is read again, what stops the run,
and the sample list held as arrays."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import passl  # noqa: F401
from passl.data import build_dataset
from passl.data.label_index import index_file
from passl.data.paths import PathTable
from passl.errors import DataError
from passl.registry import LABEL_STORES

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OLD = 1_600_000_000   # an mtime long before any check, so that no map counts as just modified


def good_map(seed, shape=(2, 3, 4, 4), top=9):
    rng = np.random.default_rng(seed)
    array = np.empty(shape, np.float16)
    array[0] = rng.normal(2, 1, shape[1:])
    array[1] = rng.integers(0, top + 1, shape[1:])
    return array


def save_map(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, array)
    os.utime(path, (OLD, OLD))


def make_tree(root, names=("a/x", "a/y", "b/z", "b/w")):
    images, labels = os.path.join(root, "img"), os.path.join(root, "lab")
    for i, name in enumerate(names):
        os.makedirs(os.path.dirname(os.path.join(images, name)), exist_ok=True)
        Image.new("RGB", (40, 30), (10 * i, 20, 30)).save(os.path.join(images, name + ".png"))
        save_map(os.path.join(labels, name + ".npy"), good_map(i))
    return images, labels


def cfg(images, labels, name="npy", **store):
    return {"dataset": {"name": "ImageFolder", "root": images},
            "label_store": {"name": name, "root": labels, **store},
            "transforms": [{"name": "RandomResizedCrop", "size": 32}], "skip_bad_images": False}


def build(images, labels, num_classes=10, **store):
    np.random.seed(0)
    return build_dataset(cfg(images, labels, **store), "train", num_classes, (2, 2))


def test_second_start_reads_no_map_and_sees_the_same_samples(tmp_path):
    images, labels = make_tree(str(tmp_path))
    first = build(images, labels)
    assert first.label_check.maps_read == 4 and os.path.isfile(first.label_check.index_path)
    assert first.label_check.index_path.startswith(os.path.join(labels, ".passl_index"))
    second = build(images, labels)
    assert second.label_check.maps_read == 0
    assert list(second.source.samples) == list(first.source.samples)
    np.testing.assert_array_equal(second.has_map, first.has_map)
    assert build(images, labels, check="full").label_check.maps_read == 4


def test_index_is_invalidated_by_an_added_removed_or_resized_map(tmp_path):
    images, labels = make_tree(str(tmp_path))
    build(images, labels)
    # added: a new image and its map; only that map is read
    Image.new("RGB", (40, 30)).save(os.path.join(images, "b", "v.png"))
    save_map(os.path.join(labels, "b", "v.npy"), good_map(7))
    added = build(images, labels)
    assert added.label_check.maps_read == 1 and len(added) == 5 and "b/v.png" in list(added.source.paths)
    # removed: the image's map is gone -> the run stops naming it (or trains it without one when allowed)
    os.remove(os.path.join(labels, "a", "y.npy"))
    with pytest.raises(DataError, match=r"a/y\.png.*looked for .*a/y\.npy"):
        build(images, labels)
    allowed = build(images, labels, allow_missing=True)
    assert allowed.missing_maps == 1 and not allowed.has_map[list(allowed.source.paths).index("a/y.png")]
    save_map(os.path.join(labels, "a", "y.npy"), good_map(1))
    assert build(images, labels).label_check.maps_read == 1
    # changed in size, with its old mtime put back: the size alone makes it read again
    save_map(os.path.join(labels, "b", "z.npy"), good_map(2, shape=(2, 3, 5, 5)))
    with pytest.raises(DataError, match=r"b/z\.npy.*shape \(2, 3, 5, 5\)"):
        build(images, labels)
    # rewritten with the same size but a new mtime: read again too
    save_map(os.path.join(labels, "b", "z.npy"), good_map(2))
    build(images, labels)
    broken = good_map(2)
    broken[0, 0, 0, 0] = np.nan
    np.save(os.path.join(labels, "b", "z.npy"), broken)
    os.utime(os.path.join(labels, "b", "z.npy"), (OLD + 5, OLD + 5))
    with pytest.raises(DataError, match=r"b/z\.npy .*image .*b/z\.png.*non-finite"):
        build(images, labels)


@pytest.mark.parametrize("damage", ["nan", "int", "negative", "fraction", "range", "pickle", "truncated"])
def test_malformed_maps_are_reported_with_their_path_at_start(tmp_path, damage):
    images, labels = make_tree(str(tmp_path))
    path = os.path.join(labels, "a", "y.npy")
    array = good_map(1)
    if damage == "nan":
        array[0, 1, 2, 3] = np.nan
    elif damage == "int":
        array = array.astype(np.int32)
    elif damage == "negative":
        array[1, 0, 0, 0] = -1
    elif damage == "fraction":
        array[1, 0, 0, 0] = 2.5
    elif damage == "range":
        array[1, 0, 0, 0] = 10
    save_map(path, array)
    if damage == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(140)          # inside the data, after the 128-byte header
    messages = {"nan": "non-finite", "int": "int32", "negative": "negative", "fraction": "not whole",
                "range": "class index 10, outside 0..9", "pickle": "Python objects", "truncated": "truncated"}
    with pytest.raises(DataError, match=r"a/y\.npy.*" + messages[damage]):
        build(images, labels)


def test_packed_store_is_checked_once_and_again_when_its_file_changes(tmp_path):
    from passl.data.label_maps import pack_label_maps
    images, labels = make_tree(str(tmp_path))
    packed = str(tmp_path / "packed")
    pack_label_maps(LABEL_STORES.build({"name": "npy", "root": labels}), packed, progress=False)
    for name in ("labels.npy", "index.json"):
        os.utime(os.path.join(packed, name), (OLD, OLD))
    first = build(images, packed, name="packed")
    assert first.label_check.maps_read == 4 and first.label_check.index_path.startswith(packed)
    assert build(images, packed, name="packed").label_check.maps_read == 0
    np.testing.assert_array_equal(first[0]["token_probs"], build(images, labels)[0]["token_probs"])
    data = np.load(os.path.join(packed, "labels.npy"))
    data[2, 0, 0, 0, 0] = np.nan                      # the row of b/w (keys are sorted)
    np.save(os.path.join(packed, "labels.npy"), data)
    with pytest.raises(DataError, match=r"labels\.npy\[b/w\].*non-finite"):
        build(images, packed, name="packed")


def mapped_files():
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_packed_store_leaves_its_file_unmapped(tmp_path):
    # a map of labels.npy keeps every page read in the process's RSS: the start-up check reads every
    # row, and a loader worker reads a row per sample over a whole epoch
    from passl.data.label_maps import pack_label_maps
    images, labels = make_tree(str(tmp_path))
    packed = str(tmp_path / "packed")
    pack_label_maps(LABEL_STORES.build({"name": "npy", "root": labels}), packed, progress=False)
    data_file = os.path.realpath(os.path.join(packed, "labels.npy"))
    dataset = build(images, packed, name="packed")
    assert dataset.label_check.maps_read == 4
    assert data_file not in mapped_files()
    from_npy = build(images, labels)
    for i in range(len(dataset)):
        np.testing.assert_array_equal(dataset.load_label_map(i), from_npy.load_label_map(i))
    assert data_file not in mapped_files()


def test_class_range_follows_num_classes_from_the_index(tmp_path):
    images, labels = make_tree(str(tmp_path))
    build(images, labels, num_classes=10)
    with pytest.raises(DataError, match=r"holds class index 9, outside 0..7 \(\d+ more maps do too\)"):
        build(images, labels, num_classes=8)


def test_damaged_or_foreign_index_is_not_trusted(tmp_path):
    images, labels = make_tree(str(tmp_path))
    path = build(images, labels).label_check.index_path
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    assert build(images, labels).label_check.maps_read == 4
    # the index holds arrays only: it loads without pickle
    with np.load(path, allow_pickle=False) as data:
        assert {"meta", "path_data", "path_offsets", "labels", "map_size", "map_mtime", "max_class"} <= set(data.files)
        assert json.loads(data["meta"].tobytes())["format"] == "passl-label-index"


def test_index_dir_and_fallback(tmp_path):
    images, labels = make_tree(str(tmp_path))
    elsewhere = str(tmp_path / "cache")
    dataset = build(images, labels, index_dir=elsewhere)
    assert dataset.label_check.index_path.startswith(elsewhere) and os.path.isfile(dataset.label_check.index_path)
    store = LABEL_STORES.build({"name": "npy", "root": str(tmp_path / "missing_root")})
    assert index_file(store, images, fallback_dir=str(tmp_path / "out")).startswith(str(tmp_path / "out"))
    assert index_file(store, images) is None


def test_sample_list_is_held_in_arrays(tmp_path):
    names = [f"c{i % 3}/{'é' if i % 2 else 'x'}_{i}" for i in range(60)]
    images, labels = make_tree(str(tmp_path), names)
    dataset = build(images, labels)
    source = dataset.source
    assert isinstance(source.paths, PathTable) and source.labels.dtype == np.int32
    assert sorted(list(source.paths)) == list(source.paths) == sorted(f"{n}.png" for n in names)
    # nothing per sample is a Python container: workers would copy it page by page as they touch it
    for owner in (dataset, source, dataset.label_store):
        for name, value in vars(owner).items():
            assert not (isinstance(value, (list, tuple, dict, set)) and len(value) >= len(dataset)), name
    table = PathTable.from_strings(["a", "", "ü/ß", "x" * 300])
    assert list(table) == ["a", "", "ü/ß", "x" * 300] and table[-1] == "x" * 300
    assert PathTable.from_strings([]).__len__() == 0


def _launch(nproc, args, log_dir):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith(("PADDLE_", "FLAGS_selected"))]:
        del env[key]
    worker = os.path.join(HERE, "label_index_worker.py")
    cmd = [sys.executable, worker, *args] if nproc == 1 else [
        sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir", str(log_dir),
        worker, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    logs = ""
    if os.path.isdir(log_dir):
        logs = "\n".join(open(os.path.join(log_dir, f)).read()[-3000:] for f in sorted(os.listdir(log_dir)))
    return done, logs


@pytest.mark.slow
def test_a_rank_reading_the_index_sees_exactly_the_samples_of_the_checking_rank(tmp_path):
    names = [f"c{i % 4}/img_{i:03d}" for i in range(40)]
    images, labels = make_tree(str(tmp_path), names)
    os.remove(os.path.join(labels, "c1", "img_005.npy"))          # a missing map travels as a flag
    results = {}
    for nproc in (2, 1):
        out = tmp_path / f"p{nproc}"
        out.mkdir()
        done, logs = _launch(nproc, [images, labels, str(out)], out / "log")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
        results[nproc] = [json.load(open(out / f"rank{r}.json")) for r in range(nproc)]
    checker, reader = results[2]
    assert not checker["from_index"] and checker["maps_read"] == 39
    assert reader["from_index"] and reader["maps_read"] == 0 and not reader["listed"]
    for key in ("samples", "has_map"):
        assert reader[key] == checker[key] == results[1][0][key], key
    assert reader["has_map"].count(False) == 1


@pytest.mark.slow
def test_a_bad_map_stops_every_rank_naming_the_map(tmp_path):
    images, labels = make_tree(str(tmp_path))
    bad = good_map(1)
    bad[0, 0, 0, 0] = np.inf
    save_map(os.path.join(labels, "a", "y.npy"), bad)
    done, logs = _launch(2, [images, labels, str(tmp_path)], tmp_path / "log")
    assert done.returncode != 0
    assert "a/y.npy" in logs and "non-finite" in logs
    assert "the label-map check failed on another process" in logs
