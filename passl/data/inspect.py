"""One training sample as the model sees it, with every token's target (tools/inspect_labels.py)."""
import numpy as np

from passl.data.datasets import build_dataset
from passl.data.targets import expand_targets
from passl.errors import ConfigError

__all__ = ["inspect_sample"]


def inspect_sample(cfg, index, seed=0):
    """Run the configured training pipeline on sample ``index`` with numpy seeded by ``seed``.

    The model of ``cfg`` is built for its geometry (num_classes, img_size, token grid), as the trainer does.
    Returns image float32 [3, H, W] (what the model sees), token_targets float32 [N, C] and
    cls_target [C] (rows sum to 1, smoothing of the configured loss), grid int64 (rows, cols),
    label int64 [], path (str), classes (the dataset's class names).
    """
    import paddle

    import passl
    with paddle.utils.unique_name.guard():
        model = passl.build_model(cfg["model"])
    num_classes, grid = model.num_classes, tuple(model.grid_size)
    dataset = build_dataset(cfg["data"]["train"], "train", num_classes, grid, model.img_size)
    if not 0 <= index < len(dataset):
        raise ConfigError(f"--index {index} is outside the training set (0..{len(dataset) - 1})")
    np.random.seed(seed)
    item = dataset[index]
    erase = (item["erase_boxes"][None], item["erase_seed"][None]) if "erase_boxes" in item else None
    batch = dataset.finish_batch({"image": paddle.to_tensor(item["image"][None])}, erase)
    image = batch["image"].numpy()[0]
    smoothing = float((cfg.get("loss") or {}).get("smoothing", 0.1))
    token_targets, cls_target = expand_targets(item, num_classes, smoothing)
    return {"image": image, "token_targets": token_targets, "cls_target": cls_target,
            "grid": np.asarray(grid, np.int64), "label": item["label"],
            "path": dataset.source.image_path(index), "classes": list(dataset.source.class_names)}
