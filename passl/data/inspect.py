"""One training sample as the model sees it, with every token's target (tools/inspect_labels.py)."""
import numpy as np

from passl.data.datasets import build_dataset
from passl.data.targets import expand_targets
from passl.errors import ConfigError
from passl.utils.fileio import atomic_path

__all__ = ["inspect_sample", "display_image", "save_sample", "render_tokens"]


def inspect_sample(cfg, index, seed=0):
    """Run the configured training pipeline on sample ``index`` with numpy seeded by ``seed``.

    The model of ``cfg`` is built for its geometry (num_classes, img_size, token grid), as the trainer does.
    Returns image float32 [3, H, W] (what the model sees), token_targets float32 [N, C] and
    cls_target [C] (rows sum to 1, smoothing of the configured loss), token_weight float32 [N] (0: the
    token lies outside its label map's coverage and has no dense target), grid int64 (rows, cols),
    label int64 [], path (str), classes (the dataset's class names), mean and std of the Normalize that
    made the image (None without one: the image is then in [0, 1]).
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
    batch = {key: paddle.to_tensor(item[key][None]) for key in ("image", "erase_boxes") if key in item}
    batch = dataset.finish_batch(batch, noise_seed=seed % (2 ** 31 - 2) + 1)
    image = batch["image"].numpy()[0]
    smoothing = float((cfg.get("loss") or {}).get("smoothing", 0.1))
    token_targets, cls_target = expand_targets(item, num_classes, smoothing)
    return {"image": image, "token_targets": token_targets, "cls_target": cls_target,
            "token_weight": np.asarray(item["token_weight"], np.float32), "grid": np.asarray(grid, np.int64), "label": item["label"],
            "path": dataset.source.image_path(index), "classes": list(dataset.source.class_names),
            "mean": dataset.normalize.mean if dataset.normalize else None,
            "std": dataset.normalize.std if dataset.normalize else None}


def display_image(result):
    """The image of an ``inspect_sample`` result un-normalised for display: uint8 [H, W, 3]."""
    image = result["image"].transpose(1, 2, 0)
    if result["mean"] is not None:
        image = image * np.asarray(result["std"]) + np.asarray(result["mean"])
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)


def save_sample(result, path):
    """Write image, token_targets, token_weight, cls_target, grid and label of ``result`` to the .npz ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, image=result["image"], token_targets=result["token_targets"], cls_target=result["cls_target"],
                 token_weight=result["token_weight"], grid=result["grid"], label=result["label"])


def render_tokens(result, path, scale=3):
    """Write a PNG of the un-normalised image magnified ``scale`` times, with the token grid and each
    token's top target class written in its cell ('-' for a token without a dense target), to check by
    eye that labels and pixels line up."""
    from PIL import Image, ImageDraw
    image = Image.fromarray(display_image(result))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    rows, cols = (int(v) for v in result["grid"])
    cell_w, cell_h = image.width / cols, image.height / rows
    top = result["token_targets"].argmax(-1).reshape(rows, cols)
    kept = result["token_weight"].reshape(rows, cols) > 0
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * cell_w, r * cell_h
            draw.rectangle([x0, y0, x0 + cell_w, y0 + cell_h], outline=(255, 255, 0))
            text = str(int(top[r, c])) if kept[r, c] else "-"
            draw.text((x0 + 2, y0 + 1), text, fill=(0, 0, 0))     # a shadow keeps it legible on any colour
            draw.text((x0 + 1, y0), text, fill=(255, 255, 255))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
