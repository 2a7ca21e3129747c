"""The transform list of a split: sizes from the model's img_size unless stated, and the device stage."""
import pytest

from passl.data.pipeline import build_transforms, resolve_transforms, split_device_stage
from passl.data.transforms import CenterCrop, Normalize, RandomErasing, RandomHorizontalFlip, ResizeShorter
from passl.errors import ConfigError

TRAIN = [{"name": "RandomHorizontalFlip"}, {"name": "RandomResizedCrop", "scale": [0.5, 1.0]},
         {"name": "Normalize"}, {"name": "RandomErasing"}]
VAL = [{"name": "ResizeShorter", "crop_pct": 0.875}, {"name": "CenterCrop", "size": None}, {"name": "Normalize"}]


def test_sizes_left_out_take_the_model_img_size():
    train = build_transforms(TRAIN, (384, 384), "data.train.transforms")
    assert train[1].size == 384 and train[1].scale == (0.5, 1.0)
    resize, crop, _ = build_transforms(VAL, (384, 384))
    assert (resize.size, crop.size) == (384, 384)
    assert resize.target_short_side() == 438                  # int(384 / 0.875)
    assert build_transforms(VAL, 224)[0].target_short_side() == 256   # an int img_size works too


def test_a_stated_size_wins_and_the_configs_are_not_changed():
    specs = [{"name": "ResizeShorter", "size": 64, "crop_pct": 1.0}, {"name": "CenterCrop"}]
    resolved = resolve_transforms(specs, (32, 32))
    assert resolved == [{"name": "ResizeShorter", "size": 64, "crop_pct": 1.0}, {"name": "CenterCrop", "size": 32}]
    assert specs[1] == {"name": "CenterCrop"}                  # the config itself is left alone
    assert resolve_transforms(TRAIN[:1], None) == TRAIN[:1]    # no size to take: no img_size needed


def test_a_missing_size_without_a_usable_img_size_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.val\.transforms\.1 \(CenterCrop\)\.size is not set"):
        build_transforms([{"name": "ResizeShorter", "size": 64}, {"name": "CenterCrop"}], None, "data.val.transforms")
    with pytest.raises(ConfigError, match="48x64 is not square"):
        build_transforms(VAL, (48, 64))
    assert build_transforms([{"name": "CenterCrop", "size": 48}], (48, 64))[0].size == 48


def test_a_transform_built_directly_needs_its_size():
    with pytest.raises(ConfigError, match="CenterCrop: size is not set"):
        CenterCrop()
    with pytest.raises(ConfigError, match="ResizeShorter: size is not set"):
        ResizeShorter(crop_pct=0.9)


def test_build_checks_the_order():
    with pytest.raises(ConfigError, match=r"data\.train\.transforms: RandomHorizontalFlip comes after Normalize"):
        build_transforms([{"name": "Normalize"}, {"name": "RandomHorizontalFlip"}], 32, "data.train.transforms")


def test_normalize_ends_the_per_sample_pipeline():
    flip, normalize, erasing = RandomHorizontalFlip(), Normalize(), RandomErasing()
    assert split_device_stage([flip, normalize, erasing]) == ([flip, erasing], normalize, erasing)
    assert split_device_stage([flip]) == ([flip], None, None)
    with pytest.raises(ConfigError, match="after Normalize"):
        split_device_stage([flip, erasing, normalize])
    with pytest.raises(ConfigError, match="after Normalize"):
        split_device_stage([flip, erasing])
    with pytest.raises(ConfigError, match="RandomHorizontalFlip comes after Normalize"):
        split_device_stage([normalize, flip])
    assert split_device_stage([RandomErasing(enable=False), normalize])[1] is normalize
