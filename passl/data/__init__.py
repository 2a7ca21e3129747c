"""Data: image datasets, dense label stores, label-aware transforms, compact token targets.

    build_dataset(cfg["data"]["train"], "train", model.num_classes, model.grid_size, model.img_size)
        -> paddle.io.Dataset
    collate_fn(items) -> dict of numpy arrays (uint8 image, label, bad_image_index, compact targets)
"""
from passl.data import label_maps, transforms, randaugment, targets, datasets, collate  # noqa: F401 (registers)
from passl.data.collate import collate_fn
from passl.data.datasets import BadImageError, ImageFolder, TokenLabelDataset, build_dataset
from passl.data.label_maps import NpyLabelStore, PackedLabelStore, PthLabelStore
from passl.data.targets import TARGET_KEYS, expand_targets
from passl.data.transforms import Sample

__all__ = ["build_dataset", "collate_fn", "TokenLabelDataset", "ImageFolder", "BadImageError", "NpyLabelStore",
           "PthLabelStore", "PackedLabelStore", "TARGET_KEYS", "expand_targets", "Sample"]
