"""Label-aware transforms: the image and its dense label map move together.

A :class:`Sample` carries the image, its label map and two boxes in the *reference frame* (the
original image's pixel coordinates, x right, y down, pixel i spanning [i, i+1)):

- ``map_region``: the part of the reference frame the label map covers (set by the store's coverage);
- ``view``: the part of the reference frame the current image shows (starts as the whole image,
  becomes the crop box after RandomResizedCrop).

Flip reflects both about the view's centre line and flips the map array. Geometric RandAugment ops
resample the small map array in place (nearest, scores 0 outside). Crops only change ``view``:
the target builder (targets.py) pools the map over ``view``, so no map is ever resized to image size.

Every transform is ``t(sample, rng) -> sample`` with ``rng`` a numpy Generator, takes ``enable``
(false turns it off from YAML), and may pre-plan its randomness before the image is decoded
(``plan``) to tell the decoder how far JPEG draft decoding may shrink the image.

A ``size`` argument is an output side in pixels. In a config it may be left out: the pipeline then
gives it the model's ``img_size`` (``passl.data.pipeline``); built directly, a transform needs it.
"""
import math

import numpy as np
from PIL import Image

from passl.data import pixels
from passl.data.targets import UNKNOWN
from passl.errors import ConfigError
from passl.ranges import PositiveFloat, PositiveInt, Probability, ranged
from passl.registry import TRANSFORMS

__all__ = ["Sample", "Transform", "RandomHorizontalFlip", "RandomResizedCrop", "ResizeShorter", "CenterCrop",
           "Normalize", "RandomErasing", "warp_label_map", "pil_interpolation", "interpolation_name", "INTERPOLATIONS", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def interpolation_name(name, rng=None):
    """``name`` (a key of INTERPOLATIONS); 'random' picks 'bilinear' or 'bicubic' with ``rng``."""
    if name == "random":
        return ("bilinear", "bicubic")[int(rng.integers(2))]
    return name


def pil_interpolation(name, rng=None):
    """PIL resampling filter for ``name`` (a key of INTERPOLATIONS); 'random' picks bilinear or bicubic
    with ``rng``."""
    return INTERPOLATIONS[interpolation_name(name, rng)]


def _check_interpolation(name, where):
    if name != "random" and name not in INTERPOLATIONS:
        raise ConfigError(f"{where}.interpolation: '{name}' is not one of random, {', '.join(INTERPOLATIONS)}")


def _check_size(size, where):
    if size is None:
        raise ConfigError(f"{where}: size is not set; give it, or build the transforms with "
                          "passl.data.pipeline.build_transforms, which takes the model's img_size")
    return int(size)


class Sample:
    """One image on its way through the transforms.

    image:      PIL RGB image, or uint8 [H, W, 3] RGB array once an OpenCV op ran (float32 [3, H, W]
                after Normalize applied to the sample itself)
    label_map:  float32 [2, K, h, w] or None (scores, class indices; class -1 marks an empty entry,
                class -2 (targets.UNKNOWN) a cell outside the map's coverage)
    map_region: (x0, y0, x1, y1) reference-frame box the map covers
    view:       (x0, y0, x1, y1) reference-frame box the image shows
    size:       (width, height) of the original image (the reference frame)
    erase:      RandomErasing's boxes, applied on the training device
    plans:      per-transform random parameters drawn before decoding; plans["crop"] =
                (reference-frame box, output size) of a planned crop
    """

    def __init__(self, image=None, label_map=None, map_region=None, size=None):
        self.image = image
        self.label_map = label_map
        self.size = size if size is not None else self.image_size()
        self.view = (0.0, 0.0, float(self.size[0]), float(self.size[1]))
        self.map_region = map_region if map_region is not None else self.view
        self.plans = {}
        self.erase = None

    def image_size(self):
        """(width, height) of the current image in pixels."""
        if isinstance(self.image, np.ndarray):
            if self.image.dtype == np.uint8:                   # [H, W, 3]
                return self.image.shape[1], self.image.shape[0]
            return self.image.shape[2], self.image.shape[1]    # normalised [3, H, W]
        return self.image.size

    def view_from_pixels(self, box):
        """Reference-frame box of a pixel box (x0, y0, x1, y1) of the current image."""
        width, height = self.image_size()
        vx0, vy0, vx1, vy1 = self.view
        sx, sy = (vx1 - vx0) / width, (vy1 - vy0) / height
        return (vx0 + box[0] * sx, vy0 + box[1] * sy, vx0 + box[2] * sx, vy0 + box[3] * sy)

    def pixels_from_view(self, box):
        """Pixel box of the current image for a reference-frame box."""
        width, height = self.image_size()
        vx0, vy0, vx1, vy1 = self.view
        sx, sy = width / (vx1 - vx0), height / (vy1 - vy0)
        return ((box[0] - vx0) * sx, (box[1] - vy0) * sy, (box[2] - vx0) * sx, (box[3] - vy0) * sy)


class Transform:
    """Base class: ``enable`` switches the transform off; subclasses implement ``apply``."""

    def __init__(self, enable=True):
        self.enable = enable

    def plan(self, sample, rng):
        """Draw parameters that depend only on ``sample.size`` before the image is decoded.
        Returns the largest factor by which the decoder may shrink the image (inf: any)."""
        return math.inf

    def __call__(self, sample, rng):
        return self.apply(sample, rng) if self.enable else sample

    def apply(self, sample, rng):
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _pad_map_to_view(sample):
    """Grow the map with unknown cells (same cell size, class ``targets.UNKNOWN``, score 0) until it
    covers the whole view, e.g. a centre-square map of a wide image gets unknown columns left and
    right: the image shows something there that the map does not label (targets.py leaves it out)."""
    _, k, mh, mw = sample.label_map.shape
    rx0, ry0, rx1, ry1 = sample.map_region
    vx0, vy0, vx1, vy1 = sample.view
    cw, ch = (rx1 - rx0) / mw, (ry1 - ry0) / mh
    eps = 1e-6
    left = max(0, int(math.ceil((rx0 - vx0) / cw - eps)))
    right = max(0, int(math.ceil((vx1 - rx1) / cw - eps)))
    top = max(0, int(math.ceil((ry0 - vy0) / ch - eps)))
    bottom = max(0, int(math.ceil((vy1 - ry1) / ch - eps)))
    if not (left or right or top or bottom):
        return
    out = np.zeros((2, k, mh + top + bottom, mw + left + right), sample.label_map.dtype)
    out[1] = UNKNOWN
    out[:, :, top:top + mh, left:left + mw] = sample.label_map
    sample.label_map = out
    sample.map_region = (rx0 - left * cw, ry0 - top * ch, rx1 + right * cw, ry1 + bottom * ch)


def warp_label_map(sample, inverse):
    """Resample ``sample.label_map`` after the image went through a PIL affine transform.

    inverse: (a, b, c, d, e, f) mapping an output pixel point (x, y) to the input point
    (a x + b y + c, d x + e y + f), in the image's continuous pixel coordinates (PIL's convention).
    Each map cell takes the cell under the inverse image of its centre (nearest); cells whose
    source lies outside the map (the fill pixels the op brings in) get scores 0 and class -1. The map is
    first padded with unknown cells to cover the whole view, so content the op moves out of the original
    coverage keeps its labels, and unlabelled content stays unknown wherever the op moves it.
    """
    if sample.label_map is None:
        return
    _pad_map_to_view(sample)   # so that what the op moves out of the map's region is kept
    _, _, mh, mw = sample.label_map.shape
    rx0, ry0, rx1, ry1 = sample.map_region
    width, height = sample.image_size()
    vx0, vy0, vx1, vy1 = sample.view
    # cell centres: reference frame -> image pixels
    ref_x = rx0 + (np.arange(mw) + 0.5) * (rx1 - rx0) / mw
    ref_y = ry0 + (np.arange(mh) + 0.5) * (ry1 - ry0) / mh
    px = (ref_x[None, :] - vx0) * width / (vx1 - vx0)
    py = (ref_y[:, None] - vy0) * height / (vy1 - vy0)
    a, b, c, d, e, f = inverse
    src_x = a * px + b * py + c
    src_y = d * px + e * py + f
    # image pixels -> reference frame -> map cells
    col = np.floor(((vx0 + src_x * (vx1 - vx0) / width) - rx0) * mw / (rx1 - rx0)).astype(np.int64)
    row = np.floor(((vy0 + src_y * (vy1 - vy0) / height) - ry0) * mh / (ry1 - ry0)).astype(np.int64)
    inside = (col >= 0) & (col < mw) & (row >= 0) & (row < mh)
    out = sample.label_map[:, :, np.clip(row, 0, mh - 1), np.clip(col, 0, mw - 1)]
    out[0][:, ~inside] = 0.0
    out[1][:, ~inside] = -1.0
    sample.label_map = out


@TRANSFORMS.register()
class RandomHorizontalFlip(Transform):
    """Flip image and label map together with probability ``prob``."""

    def __init__(self, prob: Probability = 0.5, enable: bool = True):
        super().__init__(enable)
        self.prob = prob

    def apply(self, sample, rng):
        if rng.random() >= self.prob:
            return sample
        if isinstance(sample.image, np.ndarray):
            sample.image = pixels.flip(sample.image)
        else:
            sample.image = sample.image.transpose(Image.FLIP_LEFT_RIGHT)
        if sample.label_map is not None:
            axis = sample.view[0] + sample.view[2]   # x -> axis - x reflects about the view's centre
            rx0, ry0, rx1, ry1 = sample.map_region
            sample.map_region = (axis - rx1, ry0, axis - rx0, ry1)
            sample.label_map = np.ascontiguousarray(sample.label_map[:, :, :, ::-1])
        return sample


def _sample_crop(width, height, scale, ratio, rng):
    """(x0, y0, w, h) of a random crop of ``scale`` x area and aspect ``ratio`` (as torchvision / timm)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height   # fallback: the whole image, clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@TRANSFORMS.register()
class RandomResizedCrop(Transform):
    """Crop a random box (``scale`` of the area, aspect in ``ratio``) and resize it to ``size`` x ``size``.

    The box is drawn on the original image size before decoding (so the decoder may shrink the
    image while the box still has ``size`` pixels) and becomes the sample's ``view``.
    interpolation: 'random' (bilinear or bicubic), or a key of INTERPOLATIONS, for enlarging; a box
    larger than ``size`` both ways is shrunk with OpenCV's area filter (``pixels.resize_box``).
    """

    def __init__(self, size: PositiveInt = None,
                 scale: ranged(list, 0, 1, low_open=True, length=2, ascending=True) = (0.08, 1.0),
                 ratio: ranged(list, 0, low_open=True, length=2, ascending=True) = (3 / 4, 4 / 3),
                 interpolation: str = "random", enable: bool = True):
        super().__init__(enable)
        _check_interpolation(interpolation, "RandomResizedCrop")
        self.size, self.scale, self.ratio = _check_size(size, "RandomResizedCrop"), tuple(scale), tuple(ratio)
        self.interpolation = interpolation

    def plan(self, sample, rng):
        if not self.enable:
            return math.inf
        x, y, w, h = _sample_crop(sample.size[0], sample.size[1], self.scale, self.ratio, rng)
        sample.plans[id(self)] = (x, y, x + w, y + h)
        # tells RandAugment which part of the image the output will need (reference frame, output size)
        sample.plans["crop"] = ((x, y, x + w, y + h), self.size)
        return min(w, h) / self.size

    def apply(self, sample, rng):
        box = sample.plans.pop(id(self), None)
        sample.plans.pop("crop", None)
        if box is None:   # not planned (image given directly): draw on the current image
            width, height = sample.image_size()
            x, y, w, h = _sample_crop(width, height, self.scale, self.ratio, rng)
            box = sample.view_from_pixels((x, y, x + w, y + h))
        interpolation = interpolation_name(self.interpolation, rng)
        pixel_box = sample.pixels_from_view(box)
        sample.image = pixels.resize_box(pixels.as_array(sample.image), pixel_box, self.size, interpolation)
        sample.view = box
        return sample


@TRANSFORMS.register()
class ResizeShorter(Transform):
    """Evaluation resize: the shorter side becomes int(size / crop_pct) (follow with CenterCrop(size))."""

    def __init__(self, size: PositiveInt = None, crop_pct: PositiveFloat = 0.9,
                 interpolation: str = "bicubic", enable: bool = True):
        super().__init__(enable)
        _check_interpolation(interpolation, "ResizeShorter")
        self.size, self.crop_pct, self.interpolation = _check_size(size, "ResizeShorter"), crop_pct, interpolation

    def target_short_side(self):
        return int(self.size / self.crop_pct)

    def plan(self, sample, rng):
        return min(sample.size) / self.target_short_side() if self.enable else math.inf

    def apply(self, sample, rng):
        width, height = sample.image_size()
        short = self.target_short_side()
        if width <= height:
            new = (short, int(short * height / width))
        else:
            new = (int(short * width / height), short)
        image = sample.image if not isinstance(sample.image, np.ndarray) else Image.fromarray(sample.image)
        # PIL's filters, as the published models were evaluated with
        sample.image = image.resize(new, pil_interpolation(self.interpolation, rng))
        return sample   # the view is unchanged: the same region, more or fewer pixels


@TRANSFORMS.register()
class CenterCrop(Transform):
    """Crop the central ``size`` x ``size`` pixels (torchvision's rounding)."""

    def __init__(self, size: PositiveInt = None, enable: bool = True):
        super().__init__(enable)
        self.size = _check_size(size, "CenterCrop")

    def apply(self, sample, rng):
        width, height = sample.image_size()
        left, top = int(round((width - self.size) / 2.0)), int(round((height - self.size) / 2.0))
        box = (left, top, left + self.size, top + self.size)
        view = sample.view_from_pixels(box)
        if isinstance(sample.image, np.ndarray):
            sample.image = np.ascontiguousarray(sample.image[top:top + self.size, left:left + self.size])
        else:
            sample.image = sample.image.crop(box)
        sample.view = view
        return sample


@TRANSFORMS.register()
class Normalize(Transform):
    """(pixel / 255 - mean) / std per channel.

    In a dataset pipeline this runs on the collated batch, on the training device (``normalize_batch``):
    workers hand over uint8 images, 4x fewer bytes than float32 (see TokenLabelDataset). Called on a
    sample directly (as generate_labels' preprocessing does), it turns the PIL image into float32 [3, H, W].
    """

    def __init__(self, mean: ranged(list, length=3) = IMAGENET_MEAN,
                 std: ranged(list, 0, low_open=True, length=3) = IMAGENET_STD, enable: bool = True):
        super().__init__(enable)
        self.mean, self.std = tuple(mean), tuple(std)
        # one 256-entry table per channel: a gather is ~4x faster than float arithmetic on the image
        levels = np.arange(256, dtype=np.float64)[None, :]
        self._table = ((levels / 255.0 - np.array(mean)[:, None]) / np.array(std)[:, None]).astype(np.float32)

    def apply(self, sample, rng):
        pixels = np.asarray(sample.image)                             # uint8 [H, W, 3]
        out = np.empty((3,) + pixels.shape[:2], np.float32)
        for channel in range(3):
            np.take(self._table[channel], pixels[:, :, channel], out=out[channel])
        sample.image = out
        return sample

    def normalize_batch(self, images):
        """uint8 (or [0, 255] float) paddle tensor [B, 3, H, W] -> (x - 255 mean) / (255 std) per channel,
        float32, on its device. (A CPU run swaps in a faster equivalent: passl/utils/cpu_fast.py.)"""
        mean = device_constant([255.0 * m for m in self.mean], images.place, [1, -1, 1, 1])
        std = device_constant([255.0 * s for s in self.std], images.place, [1, -1, 1, 1])
        return (images.astype("float32") - mean) / std


_constants = {}   # (values, shape, place) -> float32 tensor


def device_constant(values, place, shape=None):
    """float32 tensor of ``values`` (reshaped to ``shape``) on ``place``, copied there once per process and
    place: a per-step ``paddle.to_tensor`` is a host-to-device copy the GPU stream waits for. Eager mode
    only caches (a static graph gets its own constant)."""
    import paddle
    key = (tuple(float(v) for v in values), tuple(shape or ()), str(place))
    tensor = _constants.get(key)
    if tensor is None:
        tensor = paddle.to_tensor(list(key[0]), dtype="float32", place=place)
        tensor = tensor.reshape(shape) if shape else tensor
        if not paddle.in_dynamic_mode():
            return tensor
        _constants[key] = tensor
    return tensor


Fraction = ranged(float, 0, 1, low_open=True)


@TRANSFORMS.register()
class RandomErasing(Transform):
    """Erase random boxes of the normalised image (image only), as timm's RandomErasing.

    mode: 'pixel' (per-pixel normal noise), 'rand' (one normal colour per channel) or 'const' (zeros).
    The boxes are drawn per sample (``apply`` stores them in ``sample.erase``: int32 [max_count, 4] rows
    of top, left, height, width, height 0 for none); the pixels are erased on the collated, normalised
    batch on the training device (``erase_batch``, a few batch-wide ops), as timm does on the GPU.
    """

    def __init__(self, prob: Probability = 0.25, mode: str = "pixel", max_count: PositiveInt = 1,
                 min_area: Fraction = 0.02, max_area: Fraction = 1 / 3, min_aspect: Fraction = 0.3,
                 enable: bool = True):
        super().__init__(enable)
        if mode not in ("pixel", "rand", "const"):
            raise ConfigError(f"RandomErasing.mode: '{mode}' is not one of pixel, rand, const")
        if min_area > max_area:
            raise ConfigError(f"RandomErasing: min_area {min_area} is larger than max_area {max_area}")
        self.prob, self.mode, self.max_count = prob, mode, max_count
        self.min_area, self.max_area, self.min_aspect = min_area, max_area, min_aspect

    def apply(self, sample, rng):
        width, height = sample.image_size()
        boxes = np.zeros((self.max_count, 4), np.int32)
        if rng.random() < self.prob:
            log_aspect = (math.log(self.min_aspect), math.log(1 / self.min_aspect))
            count = 1 if self.max_count == 1 else int(rng.integers(1, self.max_count + 1))
            for index in range(count):
                for _ in range(10):
                    target = rng.uniform(self.min_area, self.max_area) * height * width / count
                    aspect = math.exp(rng.uniform(*log_aspect))
                    h = int(round(math.sqrt(target * aspect)))
                    w = int(round(math.sqrt(target / aspect)))
                    if w < width and h < height:
                        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                        boxes[index] = (top, left, h, w)
                        break
        sample.erase = boxes
        return sample

    def erase_batch(self, images, boxes, seed):
        """images float32 [B, C, H, W] (normalised, on the device), boxes int [B, max_count, 4] (``apply``'s
        rows; a tensor on the same device, or numpy), seed a positive int -> the images with the boxes filled.

        Without a host sync and in a fixed number of batch-wide ops: a box mask [B, max_count, H, W] from
        the rows compared with index ranges, then one ``where``. The noise comes from ``seed`` alone (the
        Loader derives it from the run's seed, epoch, rank and batch), so a resumed run erases with the same
        values and the global random state is left alone. Where boxes overlap, the later one's colour wins."""
        import paddle
        from paddle.tensor.random import gaussian
        if not isinstance(boxes, paddle.Tensor):
            boxes = paddle.to_tensor(np.asarray(boxes, np.int32), place=images.place)
        batch, channels, height, width = images.shape
        count = boxes.shape[1]
        top, left, box_h, box_w = (v.reshape([batch, count, 1, 1]) for v in boxes.astype("int32").unbind(2))
        rows = paddle.arange(height, dtype="int32").reshape([1, 1, height, 1])
        cols = paddle.arange(width, dtype="int32").reshape([1, 1, 1, width])
        inside = paddle.logical_and(paddle.logical_and(rows >= top, rows < top + box_h),
                                    paddle.logical_and(cols >= left, cols < left + box_w))   # [B, count, H, W]
        erased = inside if count == 1 else inside.any(axis=1, keepdim=True)                # [B, 1, H, W]
        if self.mode == "const":
            fill = paddle.zeros([1], images.dtype)
        elif self.mode == "pixel":
            fill = gaussian([batch, channels, height, width], seed=seed, dtype=images.dtype)
        else:   # one colour per box and channel
            colours = gaussian([batch, channels, count], seed=seed, dtype=images.dtype)
            if count == 1:
                fill = colours.reshape([batch, channels, 1, 1])
            else:
                order = paddle.arange(1, count + 1, dtype="int32").reshape([1, count, 1, 1])
                last = (inside.astype("int32") * order).argmax(axis=1).reshape([batch, 1, height * width])
                fill = paddle.take_along_axis(colours, last.expand([batch, channels, height * width]), axis=2)
                fill = fill.reshape([batch, channels, height, width])
        return paddle.where(erased, fill, images)
