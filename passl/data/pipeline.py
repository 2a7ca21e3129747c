"""The transform list of one data split: sizes from the model, and which steps run where.

A config states the image size once, as ``model.img_size``. A transform that takes a ``size``
(RandomResizedCrop, ResizeShorter, CenterCrop) and whose config leaves it out (or sets it to null)
gets the model's img_size, so a fine-tune at 384 changes ``model.img_size`` and nothing else; the
evaluation resize is then int(img_size / crop_pct). A ``size`` the config states wins.

The token grid never comes from here: the dataset takes the model's ``grid_size``.

Normalize and RandomErasing's pixel work run on the collated batch on the training device
(``TokenLabelDataset.finish_batch``); ``split_device_stage`` says which steps those are.
"""
from passl.errors import ConfigError
from passl.registry import TRANSFORMS

__all__ = ["resolve_transforms", "build_transforms", "split_device_stage"]


def _side(img_size, where):
    """The square side of the model's ``img_size`` (int or (rows, cols)) for a transform's missing size."""
    if img_size is None:
        raise ConfigError(f"{where}.size is not set and the model has no fixed img_size; set the size")
    rows, cols = (img_size, img_size) if isinstance(img_size, int) else (int(v) for v in img_size)
    if rows != cols:
        raise ConfigError(f"{where}.size is not set and model.img_size {rows}x{cols} is not square; "
                          "the transforms make square images, so set the size")
    return int(rows)


def resolve_transforms(specs, img_size=None, key="transforms"):
    """A copy of the transform configs ``specs`` ([{name, ...}]) in which every transform that takes a
    ``size`` and leaves it out (or null) has the model's ``img_size``. ``key`` names the list in errors."""
    resolved = []
    for index, spec in enumerate(specs or []):
        spec = dict(spec)
        if spec.get("size") is None and "size" in TRANSFORMS.signature(spec.get("name")):
            spec["size"] = _side(img_size, f"{key}.{index} ({spec['name']})")
        resolved.append(spec)
    return resolved


def build_transforms(specs, img_size=None, key="transforms"):
    """The Transform objects of ``specs`` with sizes resolved (``resolve_transforms``), their order checked
    (``split_device_stage``): the list a dataset runs."""
    transforms = [TRANSFORMS.build(spec) for spec in resolve_transforms(specs, img_size, key)]
    split_device_stage(transforms, key)
    return transforms


def split_device_stage(transforms, key="transforms"):
    """(transforms run per sample, Normalize or None, RandomErasing or None).

    Normalize and RandomErasing's pixel work run on the collated batch on the training device, so
    Normalize must be the last per-sample step, with only a RandomErasing (which draws its boxes per
    sample) after it. ``key`` names the config list in errors."""
    names = [type(t).__name__ for t in transforms]
    enabled = [t for t in transforms if t.enable]
    normalize = next((t for t in enabled if type(t).__name__ == "Normalize"), None)
    erasing = [t for t in enabled if type(t).__name__ == "RandomErasing"]
    if len(erasing) > 1:
        raise ConfigError(f"{key}: more than one RandomErasing; use one with max_count > 1")
    if normalize is not None:
        after = [type(t).__name__ for t in enabled[enabled.index(normalize) + 1:]]
        if any(name != "RandomErasing" for name in after):
            raise ConfigError(f"{key}: {', '.join(n for n in after if n != 'RandomErasing')} comes after "
                              f"Normalize in {names}; only RandomErasing may follow Normalize")
    if erasing and (normalize is None or enabled.index(erasing[0]) < enabled.index(normalize)):
        raise ConfigError(f"{key}: RandomErasing works on the normalised image; put it after Normalize ({names})")
    per_sample = [t for t in transforms if t is not normalize]
    return per_sample, normalize, (erasing[0] if erasing else None)
