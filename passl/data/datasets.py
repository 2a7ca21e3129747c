"""Image datasets with dense label maps: the index of images, decoding, and the per-sample pipeline.

A DATASETS entry (e.g. ``ImageFolder``) is an *image source*: ``samples`` [(relpath, class)],
``classes``, ``image_path(i)`` and ``load(i, max_reduction)``. :func:`build_dataset` wraps it with a
label store, the transforms and the target builder into a :class:`TokenLabelDataset` whose items are
dicts of numpy arrays (workers never create paddle tensors):

    image  uint8 [3, H, W]    label  int64 []    bad_image_index  int64 [] (-1: none)
    with RandomErasing: erase_boxes int32 [max_count, 4], erase_seed int64 []
    train only: target_classes [U], token_probs [N, U], token_bg [N], cls_probs [U], cls_bg []

Normalize and the pixel work of RandomErasing run on the collated batch on the training device
(``TokenLabelDataset.finish_batch``, called by the Loader), as timm's prefetcher does on the GPU.

Randomness comes from one numpy Generator per item, seeded from numpy's global generator, which
``passl.data.loader`` reseeds per sample from (seed, epoch, position).
"""
import math
import os

import numpy as np
import paddle
from PIL import Image

from passl.data.label_maps import coverage_region, label_key
from passl.data.pipeline import build_transforms, split_device_stage
from passl.data.targets import build_token_targets, fallback_targets
from passl.data.transforms import Sample
from passl.errors import ConfigError, DataError
from passl.registry import DATASETS, LABEL_STORES

__all__ = ["IMG_EXTENSIONS", "BadImageError", "ImageSource", "ImageFolder", "ImageFiles", "TokenLabelDataset",
           "build_dataset", "to_uint8_chw", "read_class_names", "read_rgb", "check_same_classes"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_MAX_SKIPS = 50


class BadImageError(DataError):
    """An image file that cannot be decoded (skippable with ``skip_bad_images: true``)."""


def read_rgb(path):
    """Decode the image file ``path`` as an RGB PIL image; DataError naming the file if it cannot be."""
    try:
        with Image.open(path) as img:
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:  # noqa: BLE001 (any decoder failure means a bad file)
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


def read_class_names(spec):
    """Class list from a file (one class per line: '<dir> [readable name]') or a YAML list.
    Returns (dirs, readable_names)."""
    if isinstance(spec, (list, tuple)):
        lines = [str(s) for s in spec]
    else:
        if not os.path.isfile(spec):
            raise DataError(f"class-name file not found: {spec}")
        with open(spec, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    dirs, names = [], []
    for line in lines:
        head, _, rest = line.replace("\t", " ").replace(",", " ", 1).partition(" ")
        dirs.append(head)
        names.append(rest.strip() or head)
    if len(set(dirs)) != len(dirs):
        raise DataError(f"class names {spec if isinstance(spec, str) else ''}: a class is listed twice")
    return dirs, names


class ImageSource:
    """Base of DATASETS entries. Subclasses set ``root``, ``samples``, ``classes`` (and ``class_names``)."""

    root = ""
    samples = ()
    classes = ()
    draft = True

    def __len__(self):
        return len(self.samples)

    def image_path(self, index):
        return os.path.join(self.root, self.samples[index][0])

    def load(self, index, max_reduction=None):
        """Decode image ``index`` as RGB. ``max_reduction(size) -> float`` says how far a JPEG may be
        shrunk while decoding (draft mode, factors 2/4/8). Returns (PIL image, original (w, h), factor)."""
        path = self.image_path(index)
        try:
            with Image.open(path) as img:
                size = img.size
                factor = 1
                limit = max_reduction(size) if max_reduction is not None else 1
                if self.draft and img.format == "JPEG" and limit >= 2:
                    wanted = 2 ** min(3, int(math.floor(math.log2(limit))))
                    img.draft("RGB", (-(-size[0] // wanted), -(-size[1] // wanted)))
                    factor = 2 ** int(round(math.log2(size[0] / img.size[0])))
                img.load()
                image = img if img.mode == "RGB" else img.convert("RGB")
        except Exception as e:  # noqa: BLE001 (any decoder failure means a bad file)
            raise BadImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None
        return image, size, factor


@DATASETS.register()
class ImageFolder(ImageSource):
    """ImageNet layout: ``root/<class_dir>/<image>``; classes are the sorted folder names, or the
    order of ``class_names`` (a file with one '<dir> [readable name]' per line, or a list).

    draft: let JPEG decoding shrink large images by 2/4/8 where the crop still gets enough pixels.
    """

    def __init__(self, root: str, class_names=None, extensions: list = IMG_EXTENSIONS, draft: bool = True):
        if not os.path.isdir(root):
            raise DataError(f"dataset folder not found: {root} (expected root/<class_dir>/<image>)")
        self.root, self.draft = root, draft
        exts = tuple(e.lower() for e in extensions)
        found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if class_names is not None:
            self.classes, self.class_names = read_class_names(class_names)
            extra = sorted(set(found) - set(self.classes))
            if extra:
                raise DataError(f"{root}: folder(s) {', '.join(extra[:5])} are not in class_names "
                                f"({len(self.classes)} classes); add them or remove the folders")
        else:
            self.classes, self.class_names = found, list(found)
        index = {name: i for i, name in enumerate(self.classes)}
        samples = []
        for name in found:
            files = sorted(e.name for e in os.scandir(os.path.join(root, name))
                           if e.is_file() and e.name.lower().endswith(exts))
            samples.extend((f"{name}/{f}", index[name]) for f in files)
        if not samples:
            raise DataError(f"no images ({', '.join(exts)}) found in {root}/<class_dir>/")
        self.samples = samples


class ImageFiles(ImageSource):
    """Image files named by their paths, one class, decoded at full size: a source for prediction."""

    draft = False

    def __init__(self, paths):
        self.samples = [(str(path), 0) for path in paths]
        self.classes = self.class_names = ("image",)


class TokenLabelDataset(paddle.io.Dataset):
    """Items of ``source`` through ``transforms``, with compact token targets when ``targets``.

    label_store: a LABEL_STORES object or None (then targets are one-hot). Every map is checked
    once here (missing / wrong shape -> DataError naming the image and the path looked up).
    skip_bad_images: an undecodable image is replaced by the next decodable one (deterministic)
    and listed in ``bad_images``; otherwise it raises DataError naming the file.

    Items carry the image as uint8; ``finish_batch`` turns a collated batch into what the model sees
    (Normalize, then RandomErasing's boxes) on the training device. ``transforms`` is what runs here.
    """

    def __init__(self, source, transforms, label_store=None, num_classes=1000, grid_size=(14, 14),
                 targets=True, skip_bad_images=False, progress=None):
        self.transforms, self.normalize, self.erasing = split_device_stage(transforms)
        self.source, self.label_store = source, label_store
        self.num_classes, self.grid_size = int(num_classes), tuple(int(g) for g in grid_size)
        self.targets, self.skip_bad_images = targets, skip_bad_images
        self.bad_images = []
        labels = [label for _, label in source.samples]
        if labels and max(labels) >= self.num_classes:
            raise ConfigError(f"{source.root}: {len(source.classes)} classes but the model has "
                              f"num_classes={self.num_classes}; set model.num_classes: {len(source.classes)}")
        self.keys = [label_key(rel) for rel, _ in source.samples]
        self.has_map = np.zeros(len(self.keys), bool)
        if label_store is not None:
            self._check_label_maps(progress)

    def _check_label_maps(self, progress):
        items = range(len(self.keys))
        if progress or (progress is None and len(self.keys) > 20000):
            from tqdm import tqdm
            items = tqdm(items, desc="check label maps", unit="img", mininterval=1.0)
        for i in items:
            self.has_map[i] = self.label_store.check(self.keys[i], image=self.source.image_path(i))
        self.missing_maps = int((~self.has_map).sum())

    def __len__(self):
        return len(self.source)

    def record_bad_images(self, indices):
        """Add the images of ``indices`` (a batch's ``bad_image_index``, -1 ignored) to ``bad_images``;
        the trainer calls this in the main process, since workers only report indices."""
        for i in np.asarray(indices).reshape(-1):
            path = self.source.image_path(int(i)) if i >= 0 else None
            if path is not None and path not in self.bad_images:
                self.bad_images.append(path)

    def __getitem__(self, index):
        rng = np.random.default_rng(np.random.randint(0, 2 ** 31, size=2))
        bad = -1
        for attempt in range(len(self) if self.skip_bad_images else 1):
            current = (index + attempt) % len(self)
            try:
                item = self.load_item(current, rng)
            except BadImageError as e:
                if not self.skip_bad_images:
                    raise BadImageError(f"{e}. Replace or remove the file, or set data.<split>.skip_bad_images: "
                                        "true to skip such images") from None
                self.record_bad_images([current])
                bad = current if bad < 0 else bad
                if attempt + 1 >= _MAX_SKIPS:
                    raise DataError(f"{_MAX_SKIPS} undecodable images in a row from {self.source.image_path(index)} "
                                    "on; is the dataset folder intact?") from None
                continue
            item["bad_image_index"] = np.asarray(bad, np.int64)
            return item
        raise DataError(f"no decodable image in {self.source.root}")

    def load_item(self, index, rng):
        """Run one sample through decode, transforms and targets (no skipping)."""
        label = self.source.samples[index][1]
        label_map = self.load_label_map(index) if self.has_map[index] else None
        sample = self.decode(index, label_map, rng)
        for transform in self.transforms:
            sample = transform(sample, rng)
        item = {"image": to_uint8_chw(sample.image), "label": np.asarray(label, np.int64)}
        if sample.erase is not None:
            item["erase_boxes"], item["erase_seed"] = sample.erase[0], np.asarray(sample.erase[1], np.int64)
        if self.targets:
            tokens = self.grid_size[0] * self.grid_size[1]
            if sample.label_map is None:
                item.update(fallback_targets(label, tokens))
            else:
                item.update(build_token_targets(sample.label_map, sample.view, sample.map_region,
                                                self.grid_size, self.num_classes))
        return item

    def finish_batch(self, batch, erase=None):
        """Collated batch (paddle tensors, image uint8 [B, 3, H, W]) -> image float32 as the model sees it:
        normalised (or scaled to [0, 1] without Normalize), with the RandomErasing boxes filled.
        ``erase``: the batch's (erase_boxes, erase_seed) as numpy, popped before the batch went to the GPU."""
        images = batch["image"]
        images = self.normalize.normalize_batch(images) if self.normalize else images.astype("float32") / 255.0
        if erase is not None:
            boxes, seeds = erase
            images = self.erasing.erase_batch(images, boxes, int(np.sum(seeds, dtype=np.int64) % (2 ** 31 - 2)) + 1)
        batch["image"] = images
        return batch

    def load_label_map(self, index):
        """float32 [2, K, h, w] of image ``index``; DataError naming the file for bad class indices."""
        key = self.keys[index]
        label_map = self.label_store.load(key)
        classes, scores = label_map[1], label_map[0]
        if not (np.isfinite(scores).all() and np.isfinite(classes).all()
                and classes.min() >= 0 and classes.max() < self.num_classes
                and np.all(classes == np.rint(classes))):
            raise DataError(f"label map {self.label_store.path(key)} (image {self.source.image_path(index)}) holds "
                            f"non-finite values or class indices outside 0..{self.num_classes - 1}; "
                            "is it a map for this dataset and num_classes?")
        return label_map.copy()

    def decode(self, index, label_map, rng):
        """Plan the transforms on the image size, decode (shrinking JPEGs where allowed) -> Sample."""
        holder = {}

        def max_reduction(size):
            holder["sample"] = sample = Sample(size=size)
            return min([t.plan(sample, rng) for t in self.transforms] + [math.inf])

        image, size, factor = self.source.load(index, max_reduction)
        sample = holder.get("sample") or Sample(size=size)
        sample.image = image
        # a draft-decoded pixel covers factor x factor original pixels
        sample.view = (0.0, 0.0, float(image.size[0] * factor), float(image.size[1] * factor))
        if label_map is not None:
            sample.label_map = label_map
            sample.map_region = coverage_region(self.label_store.coverage, *size)
        return sample


def to_uint8_chw(image):
    """PIL RGB image -> contiguous uint8 [3, H, W]."""
    return np.ascontiguousarray(np.asarray(image, np.uint8).transpose(2, 0, 1))


def build_dataset(split_cfg, split, num_classes, grid_size, img_size=None):
    """The dataset of one split from its validated config section (``cfg['data'][split]``).

    split_cfg keys: dataset {name, ...} (DATASETS), label_store null | {name, ...} (LABEL_STORES),
    transforms [{name, ...}] (TRANSFORMS), skip_bad_images; batch_size / num_workers are the loader's.
    split: 'train' (items carry compact token targets) or 'val'.
    num_classes, grid_size, img_size: the model's ``num_classes``, ``grid_size`` ((rows, cols) of its
    token grid, on which the targets are pooled) and ``img_size``, the size of every transform whose
    config leaves ``size`` out (see pipeline.py).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not split_cfg.get("dataset"):
        raise ConfigError(f"data.{split}.dataset is not set; e.g. dataset: {{name: ImageFolder, root: path/to/{split}}}")
    # sizes and order are checked before any folder scan, and errors name the key
    transforms = build_transforms(split_cfg.get("transforms"), img_size, f"data.{split}.transforms")
    source = DATASETS.build(split_cfg["dataset"])
    store = LABEL_STORES.build(split_cfg["label_store"]) if split_cfg.get("label_store") else None
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    return TokenLabelDataset(source, transforms, store, num_classes, grid_size, targets=(split == "train"),
                             skip_bad_images=bool(split_cfg.get("skip_bad_images", False)))


def check_same_classes(classes, expected, where, expected_from, fix):
    """Raise DataError unless the class list ``classes`` (of ``where``, e.g. 'data.val.dataset (val/)')
    equals ``expected`` (of ``expected_from``) name for name and in order: a label is an index into the
    list, so any difference would score every image after it against another class."""
    classes, expected = list(classes), list(expected)
    if classes == expected:
        return
    missing = [c for c in expected if c not in set(classes)]
    extra = [c for c in classes if c not in set(expected)]

    def shown(names):
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    parts = ([f"{len(missing)} missing ({shown(missing)})"] if missing else []) + (
        [f"{len(extra)} not in {expected_from} ({shown(extra)})"] if extra else [])
    differ = "; ".join(parts) or "the same names in another order"
    raise DataError(f"{where} has {len(classes)} classes and {expected_from} {len(expected)}: {differ}. Labels are "
                    f"positions in the class list, so top-1 would be wrong; {fix}")
