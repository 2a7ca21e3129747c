"""Label stores: npy / pth / packed give identical maps; conversion tools; errors that name the file."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import passl  # noqa: F401
from passl.data import build_dataset
from passl.data.label_maps import PACKED_DATA, PACKED_INDEX, coverage_region
from passl.errors import ConfigError, DataError
from passl.registry import LABEL_STORES
from passl.io.pth import save_pth


def write_tree(root, maps, kind):
    """maps: {key: array}; writes root/<key>.<kind>."""
    for key, array in maps.items():
        path = os.path.join(root, key + "." + kind)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == "npy":
            np.save(path, array)
        else:
            save_pth(array, path)


def random_maps(count=5, shape=(2, 5, 7, 7), seed=0):
    rng = np.random.default_rng(seed)
    maps = {}
    for i in range(count):
        array = np.empty(shape, np.float16)
        array[0] = rng.normal(0, 3, shape[1:])
        array[1] = rng.integers(0, 1000, shape[1:])
        maps[f"n{i % 2:08d}/img_{i}"] = array
    return maps


def run_tool(name, argv):
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "tools", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_three_stores_give_identical_maps_and_pth_round_trips(tmp_path, capsys):
    maps = random_maps()
    write_tree(str(tmp_path / "pth"), maps, "pth")
    assert run_tool("convert_labels", ["--src", str(tmp_path / "pth"), "--to", "npy", "--out",
                                       str(tmp_path / "npy"), "--no-progress"]) == 0
    assert run_tool("convert_labels", ["--src", str(tmp_path / "pth"), "--to", "packed", "--out",
                                       str(tmp_path / "packed"), "--coverage", "full", "--no-progress"]) == 0
    assert "packed 5 label maps" in capsys.readouterr().out
    stores = [LABEL_STORES.build({"name": "pth", "root": str(tmp_path / "pth")}),
              LABEL_STORES.build({"name": "npy", "root": str(tmp_path / "npy")}),
              LABEL_STORES.build({"name": "packed", "root": str(tmp_path / "packed")})]
    assert stores[2].coverage == "full"             # recorded in the index
    for key, array in maps.items():
        for store in stores:
            assert store.check(key)
            got = store.load(key, dtype=None)
            assert got.dtype == np.float16              # float16 kept all the way
            np.testing.assert_array_equal(got, array)
            np.testing.assert_array_equal(store.load(key), array.astype(np.float32))
    assert stores[1].keys() == stores[2].keys() == sorted(maps)


def test_pack_tool_from_npy_and_atomic_outputs(tmp_path):
    maps = random_maps(3)
    write_tree(str(tmp_path / "npy"), maps, "npy")
    run_tool("convert_labels", ["--src", str(tmp_path / "npy"), "--src-format", "npy", "--to", "packed",
                                "--out", str(tmp_path / "p"), "--no-progress", "--dtype", "float32"])
    assert sorted(os.listdir(tmp_path / "p")) == sorted([PACKED_DATA, PACKED_INDEX])   # no temporary files left
    index = json.loads((tmp_path / "p" / PACKED_INDEX).read_text())
    assert index["coverage"] == "center_square" and index["shape"] == [2, 5, 7, 7]
    store = LABEL_STORES.build({"name": "packed", "root": str(tmp_path / "p")})
    for key, array in maps.items():
        np.testing.assert_array_equal(store.load(key), array.astype(np.float32))
    with pytest.raises(DataError, match="records 'center_square'"):
        LABEL_STORES.build({"name": "packed", "root": str(tmp_path / "p"), "coverage": "full"})


def test_dtype_is_for_packed_stores_only(tmp_path):
    write_tree(str(tmp_path / "npy"), random_maps(1), "npy")
    with pytest.raises(ConfigError, match="--dtype applies to --to packed"):
        run_tool("convert_labels", ["--src", str(tmp_path / "npy"), "--src-format", "npy", "--to", "npy",
                                    "--out", str(tmp_path / "out"), "--dtype", "float32"])
    assert not os.path.exists(tmp_path / "out")


def test_pack_fails_cleanly_on_mismatched_shapes(tmp_path):
    maps = random_maps(3)
    maps["n00000000/odd"] = np.zeros((2, 5, 8, 8), np.float16)
    write_tree(str(tmp_path / "npy"), maps, "npy")
    with pytest.raises(DataError, match="odd.npy"):
        run_tool("convert_labels", ["--src", str(tmp_path / "npy"), "--src-format", "npy", "--to", "packed",
                                    "--out", str(tmp_path / "p"), "--no-progress"])
    assert not os.path.exists(tmp_path / "p" / PACKED_INDEX)
    assert os.listdir(tmp_path / "p") == []


def make_image_folder(root, names, size=(40, 30)):
    for rel in names:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", size, (120, 30, 200)).save(path)


def dataset_cfg(image_root, label_root, name="npy", **store):
    return {"dataset": {"name": "ImageFolder", "root": image_root},
            "label_store": {"name": name, "root": label_root, **store},
            "transforms": [{"name": "RandomResizedCrop", "size": 32}], "skip_bad_images": False}


def test_missing_and_misshapen_maps_fail_at_build_naming_image_and_path(tmp_path):
    images, labels = str(tmp_path / "img"), str(tmp_path / "lab")
    make_image_folder(images, ["a/x.JPEG", "a/y.png", "b/z.jpg"])
    write_tree(labels, {"a/x": np.zeros((2, 3, 4, 4), np.float16), "b/z": np.zeros((2, 3, 4, 4), np.float16)}, "npy")
    with pytest.raises(DataError) as err:
        build_dataset(dataset_cfg(images, labels), "train", 10, (2, 2))
    assert os.path.join(images, "a/y.png") in str(err.value) and os.path.join(labels, "a/y.npy") in str(err.value)
    # explicitly allowed: the image trains on its one-hot label
    dataset = build_dataset(dataset_cfg(images, labels, allow_missing=True), "train", 10, (2, 2))
    assert dataset.missing_maps == 1
    item = dataset[1]
    assert item["target_classes"].tolist() == [0] and np.all(item["token_probs"] == 1)
    # wrong shape: an error even when missing maps are allowed
    np.save(os.path.join(labels, "a/y.npy"), np.zeros((3, 4, 4), np.float16))
    with pytest.raises(DataError, match="y.npy.*shape"):
        build_dataset(dataset_cfg(images, labels, allow_missing=True), "train", 10, (2, 2))
    np.save(os.path.join(labels, "a/y.npy"), np.zeros((2, 3, 5, 5), np.float16))
    with pytest.raises(DataError, match=r"y.npy.*like the other maps"):
        build_dataset(dataset_cfg(images, labels), "train", 10, (2, 2))


def test_corrupt_map_files_name_the_file(tmp_path):
    images, labels = str(tmp_path / "img"), str(tmp_path / "lab")
    make_image_folder(images, ["a/x.png", "a/y.png"])
    write_tree(labels, {"a/x": np.zeros((2, 3, 4, 4), np.float16)}, "npy")
    with open(os.path.join(labels, "a", "y.npy"), "wb") as f:
        f.write(b"not a numpy file")
    with pytest.raises(DataError, match="y.npy"):
        build_dataset(dataset_cfg(images, labels), "train", 10, (2, 2))
    # a header that promises more data than the file holds (a truncated copy)
    np.save(os.path.join(labels, "a", "y.npy"), np.zeros((2, 3, 4, 4), np.float16))
    with open(os.path.join(labels, "a", "y.npy"), "r+b") as f:
        f.truncate(150)
    with pytest.raises(DataError, match="y.npy.*truncated"):
        build_dataset(dataset_cfg(images, labels), "train", 10, (2, 2))
    # damaged after the build: found when the map is read
    np.save(os.path.join(labels, "a", "y.npy"), np.zeros((2, 3, 4, 4), np.float16))
    dataset = build_dataset(dataset_cfg(images, labels), "train", 10, (2, 2))
    with open(os.path.join(labels, "a", "y.npy"), "r+b") as f:
        f.truncate(150)
    with pytest.raises(DataError, match="y.npy"):
        dataset[1]
    # class indices outside num_classes
    bad = np.zeros((2, 3, 4, 4), np.float16)
    bad[1] = 50
    np.save(os.path.join(labels, "a", "y.npy"), bad)
    with pytest.raises(DataError, match="y.npy.*outside 0..9"):
        build_dataset(dataset_cfg(images, labels), "train", 10, (2, 2))[1]
    # a .pth that is not a PyTorch file
    os.makedirs(tmp_path / "pth" / "a")
    (tmp_path / "pth" / "a" / "x.pth").write_bytes(b"garbage")
    save_pth(np.zeros((2, 3, 4, 4), np.float16), str(tmp_path / "pth" / "a" / "y.pth"))
    with pytest.raises(DataError, match="x.pth"):
        build_dataset(dataset_cfg(images, str(tmp_path / "pth"), name="pth"), "train", 10, (2, 2))


def test_packed_store_damaged_after_the_build_names_the_file(tmp_path):
    from passl.data.label_maps import pack_label_maps
    images, labels = str(tmp_path / "img"), str(tmp_path / "lab")
    make_image_folder(images, ["a/x.png", "a/y.png"])
    write_tree(labels, {"a/x": np.ones((2, 3, 4, 4), np.float16), "a/y": np.ones((2, 3, 4, 4), np.float16)}, "npy")
    packed = str(tmp_path / "packed")
    pack_label_maps(LABEL_STORES.build({"name": "npy", "root": labels}), packed, progress=False)
    dataset = build_dataset(dataset_cfg(images, packed, name="packed"), "train", 10, (2, 2))
    dataset[1]
    data_file = os.path.join(packed, "labels.npy")
    with open(data_file, "r+b") as f:             # cut inside the last row (a/y)
        f.truncate(os.path.getsize(data_file) - 10)
    dataset[0]
    with pytest.raises(DataError, match=r"labels\.npy is truncated: row 1 \(a/y\)"):
        dataset[1]
    # a file rewritten with rows of another shape than the index records
    np.save(data_file, np.ones((2, 2, 3, 5, 5), np.float16))
    fresh = LABEL_STORES.build({"name": "packed", "root": packed})
    with pytest.raises(DataError, match=r"labels\.npy holds array of shape \(2, 2, 3, 5, 5\).*rows of \[2, 3, 4, 4\]"):
        fresh.load("a/x")
    # a file of Python objects (a pickle): refused unread, with its name, at start as when reading
    np.save(data_file, np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"labels\.npy: it holds Python objects"):
        build_dataset(dataset_cfg(images, packed, name="packed"), "train", 10, (2, 2))
    for read in (lambda store: store.load("a/x"), lambda store: store.validate(["a/x"])):
        with pytest.raises(DataError, match=r"labels\.npy.*Python objects"):
            read(LABEL_STORES.build({"name": "packed", "root": packed}))


def test_coverage_regions():
    assert coverage_region("full", 300, 200) == (0, 0, 300, 200)
    assert coverage_region("center_square", 300, 200) == (50, 0, 250, 200)
    assert coverage_region("center_square", 200, 300) == (0, 50, 200, 250)
    with pytest.raises(DataError, match="coverage"):
        coverage_region("corner", 10, 10)
