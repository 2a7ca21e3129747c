"""Image datasets with dense label maps: the index of images, decoding, and the per-sample pipeline.

A DATASETS entry (e.g. ``ImageFolder``) is an *image source*: ``paths`` (a PathTable of relative paths)
and ``labels`` (int32 array), ``classes``, ``image_path(i)`` and ``load(i, max_reduction)``; sample
lists are numpy arrays, not Python lists, so forked loader workers share them instead of copying them. :func:`build_dataset` wraps it with a
label store, the transforms and the target builder into a :class:`TokenLabelDataset` whose items are
dicts of numpy arrays (workers never create paddle tensors):

    image  uint8 [3, H, W]    label  int64 []    bad_image_index  int64 [] (-1: none)
    with RandomErasing: erase_boxes int32 [max_count, 4]
    train only: target_classes [U], token_probs [N, U], token_bg [N], token_weight [N], cls_probs [U],
                cls_bg []

Normalize and the pixel work of RandomErasing run on the collated batch on the training device
(``TokenLabelDataset.finish_batch``, called by the Loader), as timm's prefetcher does on the GPU.

Randomness comes from one numpy Generator per item, seeded from numpy's global generator, which
``passl.data.loader`` reseeds per sample from (seed, epoch, position).
"""
import io
import math
import os

import numpy as np
import paddle
from PIL import Image

from passl.data.label_index import shared_label_check
from passl.data import pixels
from passl.data.label_maps import coverage_region, label_key
from passl.data.paths import PathTable, SampleList
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
    """Base of DATASETS entries. Subclasses set ``root``, ``classes`` (and ``class_names``), and ``paths``
    (a PathTable of image paths relative to ``root``) with ``labels`` (int32 [n] class indices)."""

    root = ""
    classes = ()
    draft = True

    @property
    def samples(self):
        """``(relative path, class index)`` per image (a read-only sequence)."""
        return SampleList(self.paths, self.labels)

    def __len__(self):
        return len(self.paths)

    def image_path(self, index):
        return os.path.join(self.root, self.paths[index])

    def load(self, index, max_reduction=None):
        """Decode image ``index`` as RGB. ``max_reduction(size) -> float`` says how far a JPEG may be
        shrunk while decoding (draft mode, factors 2/4/8). Returns (image, original (w, h), factor):
        a uint8 [H, W, 3] array for colour and grey JPEGs (decoded by OpenCV's libjpeg-turbo: the
        same pixels as PIL's, at the same reductions, without PIL's copy), else a PIL RGB image."""
        path = self.image_path(index)
        try:
            with open(path, "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as img:   # reads the header only
                size = img.size
                limit = max_reduction(size) if max_reduction is not None else 1
                scale = 1
                if self.draft and img.format == "JPEG" and limit >= 2:
                    # the reduction PIL's JpegImageFile.draft picks for this request
                    wanted = 2 ** min(3, int(math.floor(math.log2(limit))))
                    fits = min(size[0] // -(-size[0] // wanted), size[1] // -(-size[1] // wanted))
                    scale = next(s for s in (8, 4, 2, 1) if fits >= s)
                # OpenCV decodes a truncated JPEG without a word: files not ending in the end-of-image
                # marker go to PIL, which says "truncated" (or decodes them as it always did)
                if img.format == "JPEG" and img.mode in ("RGB", "L") and data.rstrip(b"\0")[-2:] == b"\xff\xd9":
                    image = pixels.decode_jpeg(data, scale)
                    return image, size, scale
                if scale > 1:
                    img.draft("RGB", (-(-size[0] // scale), -(-size[1] // scale)))
                img.load()
                image = img if img.mode == "RGB" else img.convert("RGB")
                factor = 2 ** int(round(math.log2(size[0] / image.size[0])))
        except Exception as e:  # noqa: BLE001 (any decoder failure means a bad file)
            raise BadImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None
        return image, size, factor


@DATASETS.register()
class ImageFolder(ImageSource):
    """ImageNet layout: ``root/<class_dir>/<image>``; classes are the sorted folder names, or the
    order of ``class_names`` (a file with one '<dir> [readable name]' per line, or a list).

    The class folders are listed when the images are first needed (``paths``), unless the sample list
    comes from a label-map index another process wrote (``adopt``).
    draft: let JPEG decoding shrink large images by 2/4/8 where the crop still gets enough pixels.
    """

    def __init__(self, root: str, class_names=None, extensions: list = IMG_EXTENSIONS, draft: bool = True):
        if not os.path.isdir(root):
            raise DataError(f"dataset folder not found: {root} (expected root/<class_dir>/<image>)")
        self.root, self.draft = root, draft
        self.extensions = tuple(e.lower() for e in extensions)
        self._found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if class_names is not None:
            self.classes, self.class_names = read_class_names(class_names)
            extra = sorted(set(self._found) - set(self.classes))
            if extra:
                raise DataError(f"{root}: folder(s) {', '.join(extra[:5])} are not in class_names "
                                f"({len(self.classes)} classes); add them or remove the folders")
        else:
            self.classes, self.class_names = self._found, list(self._found)
        self._paths = self._labels = None
        self.listed = False     # True once this process has listed the class folders

    @property
    def paths(self):
        if self._paths is None:
            self._scan()
        return self._paths

    @property
    def labels(self):
        if self._labels is None:
            self._scan()
        return self._labels

    def _scan(self):
        index = {name: i for i, name in enumerate(self.classes)}
        names, counts = [], []
        for name in self._found:
            # names only (no per-entry stat or DirEntry): a folder named like an image would fail to decode
            files = sorted(f for f in os.listdir(os.path.join(self.root, name)) if f.lower().endswith(self.extensions))
            names.extend(f"{name}/{f}" for f in files)
            counts.append((index[name], len(files)))
        if not names:
            raise DataError(f"no images ({', '.join(self.extensions)}) found in {self.root}/<class_dir>/")
        self.listed = True
        self._paths = PathTable.from_strings(names)
        self._labels = np.repeat(np.array([c for c, _ in counts], np.int32), [n for _, n in counts])

    def adopt(self, paths, labels):
        """Use this sample list (a PathTable, int labels) instead of listing the folders."""
        self._paths, self._labels = paths, np.asarray(labels, np.int32)


class ImageFiles(ImageSource):
    """Image files named by their paths, one class, decoded at full size: a source for prediction."""

    draft = False

    def __init__(self, paths):
        self.paths = PathTable.from_strings(str(path) for path in paths)
        self.labels = np.zeros(len(self.paths), np.int32)
        self.classes = self.class_names = ("image",)


class TokenLabelDataset(paddle.io.Dataset):
    """Items of ``source`` through ``transforms``, with compact token targets when ``targets``.

    label_store: a LABEL_STORES object or None (then targets are one-hot). Every map is checked
    here, before any step (missing, wrong shape or dtype, NaN, class outside 0..num_classes-1 ->
    DataError naming the image and the map), through the index of passl.data.label_index, kept in
    the store's index_dir (or its root, else ``cache_dir``) and shared by the processes of a machine.
    skip_bad_images: an undecodable image is replaced by the next decodable one (deterministic)
    and listed in ``bad_images``; otherwise it raises DataError naming the file.

    Items carry the image as uint8; ``finish_batch`` turns a collated batch into what the model sees
    (Normalize, then RandomErasing's boxes) on the training device. ``transforms`` is what runs here.
    """

    def __init__(self, source, transforms, label_store=None, num_classes=1000, grid_size=(14, 14),
                 targets=True, skip_bad_images=False, progress=None, cache_dir=None):
        self.transforms, self.normalize, self.erasing = split_device_stage(transforms)
        self.source, self.label_store = source, label_store
        self.num_classes, self.grid_size = int(num_classes), tuple(int(g) for g in grid_size)
        self.targets, self.skip_bad_images = targets, skip_bad_images
        self.bad_images = []
        self.label_check = None
        if label_store is not None:
            # lists the images on one process per machine; the others take the list from its index
            self.label_check = shared_label_check(source, label_store, self.num_classes, cache_dir, progress)
            self.has_map = self.label_check.has_map
            self.missing_maps = self.label_check.missing
        self._check_classes()
        if label_store is None:
            self.has_map = np.zeros(len(source), bool)

    def _check_classes(self):
        labels = self.source.labels
        if len(labels) and int(np.max(labels)) >= self.num_classes:
            raise ConfigError(f"{self.source.root}: {len(self.source.classes)} classes but the model has "
                              f"num_classes={self.num_classes}; set model.num_classes: {len(self.source.classes)}")

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
        label = int(self.source.labels[index])
        label_map = self.load_label_map(index) if self.has_map[index] else None
        sample = self.decode(index, label_map, rng)
        for transform in self.transforms:
            sample = transform(sample, rng)
        item = {"image": to_uint8_chw(sample.image), "label": np.asarray(label, np.int64)}
        if sample.erase is not None:
            item["erase_boxes"] = sample.erase
        if self.targets:
            tokens = self.grid_size[0] * self.grid_size[1]
            if sample.label_map is None:
                item.update(fallback_targets(label, tokens))
            else:
                item.update(build_token_targets(sample.label_map, sample.view, sample.map_region,
                                                self.grid_size, self.num_classes, label))
        return item

    def finish_batch(self, batch, noise_seed=1):
        """Collated batch (paddle tensors on the training device, image uint8 [B, 3, H, W]) -> image float32
        as the model sees it: normalised (or scaled to [0, 1] without Normalize), with the RandomErasing boxes
        (``erase_boxes``, removed from the batch) filled with noise drawn from ``noise_seed`` (a positive int).
        Nothing here reads a tensor back to the host."""
        images = batch["image"]
        images = self.normalize.normalize_batch(images) if self.normalize else images.astype("float32") / 255.0
        boxes = batch.pop("erase_boxes", None)
        if boxes is not None and self.erasing is not None:
            images = self.erasing.erase_batch(images, boxes, noise_seed)
        batch["image"] = images
        return batch

    def load_label_map(self, index):
        """float32 [2, K, h, w] of image ``index``; DataError naming the file for bad class indices."""
        key = label_key(self.source.paths[index])
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
        width, height = sample.image_size()
        sample.view = (0.0, 0.0, float(width * factor), float(height * factor))
        if label_map is not None:
            sample.label_map = label_map
            sample.map_region = coverage_region(self.label_store.coverage, *size)
        return sample


def to_uint8_chw(image):
    """PIL RGB image or uint8 [H, W, 3] -> contiguous uint8 [3, H, W]."""
    return np.ascontiguousarray(np.asarray(image, np.uint8).transpose(2, 0, 1))


def build_dataset(split_cfg, split, num_classes, grid_size, img_size=None, cache_dir=None):
    """The dataset of one split from its validated config section (``cfg['data'][split]``).

    split_cfg keys: dataset {name, ...} (DATASETS), label_store null | {name, ...} (LABEL_STORES),
    transforms [{name, ...}] (TRANSFORMS), skip_bad_images; batch_size / num_workers are the loader's.
    split: 'train' (items carry compact token targets) or 'val'.
    num_classes, grid_size, img_size: the model's ``num_classes``, ``grid_size`` ((rows, cols) of its
    token grid, on which the targets are pooled) and ``img_size``, the size of every transform whose
    config leaves ``size`` out (see pipeline.py). cache_dir: where the label-map index goes when the
    label root is read-only and the store names no index_dir (the trainer passes output_dir).
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
                             skip_bad_images=bool(split_cfg.get("skip_bad_images", False)), cache_dir=cache_dir)


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
