"""ImageFolder, TokenLabelDataset items, bad images, determinism, draft decoding, sizes from the model."""
import os

import numpy as np
import pytest
from PIL import Image

import passl  # noqa: F401
from passl.data import build_dataset, collate_fn
from passl.errors import ConfigError, DataError

TRAIN = [{"name": "RandomHorizontalFlip"}, {"name": "RandAugment"}, {"name": "RandomResizedCrop", "size": 32},
         {"name": "Normalize"}, {"name": "RandomErasing"}]


def make_folder(root, per_class=3, classes=("b_cat", "a_dog", "c_eel"), size=(48, 36), maps=None):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, c, f"{c}_{i}.jpg"), quality=90)
            if maps:
                os.makedirs(os.path.join(maps, c), exist_ok=True)
                label_map = np.zeros((2, 2, 4, 4), np.float16)
                label_map[0] = rng.normal(2, 1, (2, 4, 4))
                label_map[1] = rng.integers(0, len(classes), (2, 4, 4))
                np.save(os.path.join(maps, c, f"{c}_{i}.npy"), label_map)
    (open(os.path.join(root, "README.txt"), "w")).close()      # stray files are ignored


def cfg(root, maps=None, transforms=TRAIN, skip=False, **dataset):
    return {"dataset": {"name": "ImageFolder", "root": root, **dataset},
            "label_store": {"name": "npy", "root": maps} if maps else None,
            "transforms": transforms, "skip_bad_images": skip}


def test_image_folder_classes_and_items(tmp_path):
    root, maps = str(tmp_path / "train"), str(tmp_path / "maps")
    make_folder(root, maps=maps)
    dataset = build_dataset(cfg(root, maps), "train", 3, (2, 2))
    assert dataset.source.classes == ["a_dog", "b_cat", "c_eel"]
    assert len(dataset) == 9 and dataset.source.samples[0] == ("a_dog/a_dog_0.jpg", 0)
    item = dataset[4]
    assert set(item) == {"image", "label", "bad_image_index", "target_classes", "token_probs", "token_bg",
                         "token_weight", "cls_probs", "cls_bg", "erase_boxes"}
    assert all(isinstance(v, np.ndarray) for v in item.values())        # numpy only, never paddle
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == np.uint8   # normalised on the device
    assert item["erase_boxes"].shape == (1, 4)
    assert int(item["label"]) == 1 and item["token_probs"].shape[0] == 4
    val = build_dataset(cfg(root, transforms=[{"name": "ResizeShorter", "size": 32, "crop_pct": 0.875},
                                              {"name": "CenterCrop", "size": 32}, {"name": "Normalize"}]),
                        "val", 3, (2, 2))
    assert set(val[0]) == {"image", "label", "bad_image_index"} and val[0]["image"].shape == (3, 32, 32)
    with pytest.raises(ConfigError, match="num_classes"):
        build_dataset(cfg(root), "train", 2, (2, 2))
    with pytest.raises(ConfigError, match=r"data\.train\.transforms: RandomHorizontalFlip comes after Normalize"):
        build_dataset(cfg(root, transforms=[{"name": "Normalize"}, {"name": "RandomHorizontalFlip"}]), "train", 3, (2, 2))


def test_class_names_file_orders_classes(tmp_path):
    root = str(tmp_path / "train")
    make_folder(root, per_class=1)
    names = tmp_path / "classes.txt"
    names.write_text("c_eel eel\nb_cat a cat\na_dog\n")
    dataset = build_dataset(cfg(root, class_names=str(names)), "train", 3, (2, 2))
    assert dataset.source.classes == ["c_eel", "b_cat", "a_dog"]
    assert dataset.source.class_names == ["eel", "a cat", "a_dog"]
    assert dict(dataset.source.samples)["c_eel/c_eel_0.jpg"] == 0
    names.write_text("c_eel\nb_cat\n")
    with pytest.raises(DataError, match="a_dog.*not in class_names"):
        build_dataset(cfg(root, class_names=str(names)), "train", 3, (2, 2))


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_dataset(cfg(str(tmp_path / "nope")), "train", 3, (2, 2))
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(DataError, match="no images"):
        build_dataset(cfg(str(tmp_path / "empty")), "train", 3, (2, 2))


def test_same_seed_same_sample_and_epochs_differ(tmp_path):
    root, maps = str(tmp_path / "train"), str(tmp_path / "maps")
    make_folder(root, maps=maps)
    dataset = build_dataset(cfg(root, maps), "train", 3, (2, 2))
    np.random.seed(5)
    first = dataset[2]
    np.random.seed(5)
    again = dataset[2]
    np.random.seed(6)
    other = dataset[2]
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["image"], other["image"])


def test_corrupt_image_raises_naming_the_file(tmp_path):
    root = str(tmp_path / "train")
    make_folder(root)
    bad = os.path.join(root, "b_cat", "b_cat_1.jpg")
    with open(bad, "r+b") as f:
        f.truncate(30)
    dataset = build_dataset(cfg(root), "train", 3, (2, 2))
    with pytest.raises(DataError, match="b_cat_1.jpg"):
        dataset[4]


def test_skip_bad_images_counts_and_lists(tmp_path):
    root = str(tmp_path / "train")
    make_folder(root)
    for name in ("b_cat/b_cat_1.jpg", "b_cat/b_cat_2.jpg"):
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"\xff\xd8 not really a jpeg")
    dataset = build_dataset(cfg(root, skip=True), "train", 3, (2, 2))
    np.random.seed(0)
    item = dataset[4]                                    # b_cat_1 -> b_cat_2 (bad) -> c_eel_0
    assert int(item["bad_image_index"]) == 4 and int(item["label"]) == 2
    assert int(dataset[0]["bad_image_index"]) == -1
    assert [os.path.basename(p) for p in dataset.bad_images] == ["b_cat_1.jpg", "b_cat_2.jpg"]
    # in the main process, indices reported by workers are turned into the same list
    fresh = build_dataset(cfg(root, skip=True), "train", 3, (2, 2))
    batch = collate_fn([dataset[0], dataset[4], dataset[5]])
    fresh.record_bad_images(batch["bad_image_index"])
    assert [os.path.basename(p) for p in fresh.bad_images] == ["b_cat_1.jpg", "b_cat_2.jpg"]


def test_draft_decoding_shrinks_large_jpegs_only_when_the_crop_allows(tmp_path):
    root = str(tmp_path / "train")
    make_folder(root, per_class=1, size=(800, 600))
    dataset = build_dataset(cfg(root, transforms=[{"name": "RandomResizedCrop", "size": 32}]), "train", 3, (2, 2))
    sizes = []
    for seed in range(5):
        sample = dataset.decode(0, None, np.random.default_rng(seed))
        sizes.append(sample.image_size())
        assert sample.view[2] == pytest.approx(800, abs=8) and sample.view[3] == pytest.approx(600, abs=8)
    assert all(w <= 200 and h <= 150 for w, h in sizes)   # a 32-px crop never needs more than 1/4 scale
    big = build_dataset(cfg(root, transforms=[{"name": "RandomResizedCrop", "size": 600, "scale": [1, 1]}]),
                        "train", 3, (2, 2))
    assert big.decode(0, None, np.random.default_rng(0)).image_size() == (800, 600)
    off = build_dataset(cfg(root, draft=False, transforms=[{"name": "RandomResizedCrop", "size": 32}]),
                        "train", 3, (2, 2))
    assert off.decode(0, None, np.random.default_rng(0)).image_size() == (800, 600)


def test_paddle_dataloader_with_workers_gives_numpy_batches(tmp_path):
    import paddle
    root, maps = str(tmp_path / "train"), str(tmp_path / "maps")
    make_folder(root, maps=maps)
    dataset = build_dataset(cfg(root, maps), "train", 3, (2, 2))
    loader = paddle.io.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_fn, return_list=True)
    batch = list(loader)[0]   # run the epoch out, so that the workers exit before the test ends
    assert batch["image"].shape == [4, 3, 32, 32] and batch["token_probs"].shape[:2] == [4, 4]
    from passl.models.outputs import TokenLabelOutput
    loss = passl.build_loss({"name": "TokenLabelCrossEntropy"})(
        TokenLabelOutput(paddle.randn([4, 3]), paddle.randn([4, 4, 3]), paddle.to_tensor([0, 0, 1, 1], dtype="int64")),
        batch)
    assert np.isfinite(float(loss["loss"]))


def test_transform_sizes_follow_the_model_img_size(tmp_path):
    root, maps = str(tmp_path / "train"), str(tmp_path / "maps")
    make_folder(root, maps=maps)
    unsized = [{k: v for k, v in t.items() if k != "size"} for t in TRAIN]
    train = build_dataset(cfg(root, maps, transforms=unsized), "train", 3, (3, 3), (48, 48))
    item = train[0]
    assert item["image"].shape == (3, 48, 48) and item["token_probs"].shape[0] == 9   # grid from the caller
    val = build_dataset(cfg(root, transforms=[{"name": "ResizeShorter", "crop_pct": 0.8}, {"name": "CenterCrop"}]),
                        "val", 3, (2, 2), (32, 32))
    assert val[0]["image"].shape == (3, 32, 32)
    with pytest.raises(ConfigError, match=r"data\.train\.transforms\.2 \(RandomResizedCrop\)\.size is not set"):
        build_dataset(cfg(root, transforms=unsized), "train", 3, (2, 2))
