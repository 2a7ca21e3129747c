"""passl.data.inspect through tools/inspect_labels.py: one training sample and its token targets."""
import importlib.util
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from passl.config import load_config
from passl.data.inspect import display_image, inspect_sample
from passl.errors import ConfigError
from test_datasets import cfg, make_folder

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools", "inspect_labels.py")


def test_inspect_labels_tool(tmp_path, capsys):
    root, maps = str(tmp_path / "train"), str(tmp_path / "maps")
    make_folder(root, maps=maps)
    config = {"model": {"name": "lvvit_t", "img_size": 32, "num_classes": 3},
              "data": {"train": cfg(root, maps)}}
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(config))
    spec = importlib.util.spec_from_file_location("inspect_labels", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, png = tmp_path / "s.npz", tmp_path / "s.png"
    argv = ["-c", str(config_path), "--index", "3", "--seed", "1", "--out", str(out), "--png", str(png)]
    assert module.main(argv) == 0
    saved = np.load(out)
    assert saved["image"].shape == (3, 32, 32) and saved["token_targets"].shape == (4, 3)
    np.testing.assert_allclose(saved["token_targets"].sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(saved["cls_target"].sum(), 1, atol=1e-5)
    assert saved["token_weight"].shape == (4,)
    assert saved["grid"].tolist() == [2, 2] and Image.open(png).size == (96, 96)
    assert "wrote" in capsys.readouterr().out
    module.main(argv[:-4] + ["--out", str(tmp_path / "t.npz")])
    np.testing.assert_array_equal(np.load(tmp_path / "t.npz")["image"], saved["image"])   # same seed, same sample


def test_the_sample_has_the_model_geometry(tmp_path):
    root, maps = str(tmp_path / "train"), str(tmp_path / "maps")
    make_folder(root, maps=maps)
    train = cfg(root, maps, transforms=[{"name": "RandomResizedCrop"}, {"name": "Normalize"}])   # size: the model's
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump({"model": {"name": "lvvit_t", "img_size": 48, "num_classes": 3},
                                           "data": {"train": train}}))
    result = inspect_sample(load_config(str(config_path)), 2, seed=0)
    assert result["image"].shape == (3, 48, 48) and result["grid"].tolist() == [3, 3]
    assert result["token_targets"].shape == (9, 3) and result["classes"] == ["a_dog", "b_cat", "c_eel"]
    with pytest.raises(ConfigError, match="--index 9 is outside the training set"):
        inspect_sample(load_config(str(config_path)), 9)


def test_the_png_image_is_the_sample_before_normalisation(tmp_path):
    """display_image undoes the config's own Normalize (not ImageNet's): the dataset's uint8 pixels come back."""
    from passl.data import build_dataset
    root = str(tmp_path / "train")
    make_folder(root)
    train = cfg(root, transforms=[{"name": "RandomResizedCrop"}, {"name": "Normalize", "mean": [0.2, 0.5, 0.7],
                                                                   "std": [0.3, 0.2, 0.1]}])
    config = {"model": {"name": "lvvit_t", "img_size": 32, "num_classes": 3}, "data": {"train": train}}
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = inspect_sample(load_config(str(config_path)), 4, seed=3)
    np.random.seed(3)
    pixels = build_dataset(train, "train", 3, (2, 2), (32, 32))[4]["image"].transpose(1, 2, 0)   # uint8 [H, W, 3]
    shown = display_image(result)
    assert shown.dtype == np.uint8 and shown.shape == (32, 32, 3)
    assert np.abs(shown.astype(int) - pixels).max() <= 1
