"""RandAugment configured by a timm-style string, moving the label map with every geometric op.

``rand-m9-mstd0.5-inc1`` means: ``n`` ops per image (default 2), each applied with probability ``p``
(default 0.5), magnitude ~ N(m, mstd) clipped to [0, mmax] (default 10) drawn per op, ``inc1``
selects the variants whose strength grows with the magnitude. Colour ops change the image only;
Rotate, ShearX/Y and TranslateX/YRel apply one affine transform to the image (random bilinear or
bicubic, ``fill`` outside) and to the label map (nearest at the map's own resolution, scores 0
outside) -- see ``transforms.warp_label_map``. The ops are timm's (PIL's); they run on uint8 arrays
with OpenCV (``passl.data.pixels``, which lists where its pixels differ from PIL's).
"""
import math

import numpy as np

from passl.data import pixels
from passl.data.transforms import Transform, _check_interpolation, interpolation_name, warp_label_map
from passl.errors import ConfigError
from passl.ranges import Range, ranged
from passl.registry import TRANSFORMS

__all__ = ["RandAugment", "parse_rand_config", "GEOMETRIC_OPS", "COLOR_OPS"]

_MAX_LEVEL = 10.0
_GLOBAL_OPS = ("AutoContrast", "Equalize", "Contrast", "ContrastIncreasing")   # use whole-image statistics
_TRANSLATE_PCT = 0.45


def _signed(value, rng):
    return -value if rng.random() < 0.5 else value


# -- geometric ops: return the inverse affine (output pixel -> input pixel), PIL's convention ----------

def _size(image):
    """(width, height) of a PIL image or a uint8 [H, W, 3] array."""
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def _rotate(image, level, rng):
    degrees = _signed(level / _MAX_LEVEL * 30.0, rng)
    # the matrix PIL's Image.rotate builds: rotation by `degrees` anticlockwise about the centre
    angle = -math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    width, height = _size(image)
    cx, cy = width / 2.0, height / 2.0
    return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def _shear_x(image, level, rng):
    return (1.0, _signed(level / _MAX_LEVEL * 0.3, rng), 0.0, 0.0, 1.0, 0.0)


def _shear_y(image, level, rng):
    return (1.0, 0.0, 0.0, _signed(level / _MAX_LEVEL * 0.3, rng), 1.0, 0.0)


def _translate_x(image, level, rng):
    return (1.0, 0.0, _signed(level / _MAX_LEVEL * _TRANSLATE_PCT, rng) * _size(image)[0], 0.0, 1.0, 0.0)


def _translate_y(image, level, rng):
    return (1.0, 0.0, 0.0, 0.0, 1.0, _signed(level / _MAX_LEVEL * _TRANSLATE_PCT, rng) * _size(image)[1])


GEOMETRIC_OPS = {"Rotate": _rotate, "ShearX": _shear_x, "ShearY": _shear_y,
                 "TranslateXRel": _translate_x, "TranslateYRel": _translate_y}


# -- colour ops: uint8 [H, W, 3] -> uint8 [H, W, 3] (passl.data.pixels says how they compare with PIL's) --

def _enhance(degenerate, increasing):
    def op(image, level, rng):
        if increasing:
            factor = 1.0 + _signed(level / _MAX_LEVEL * 0.9, rng)
        else:
            factor = level / _MAX_LEVEL * 1.8 + 0.1
        return pixels.blend(image, degenerate(image), factor)
    return op


def _colour_degenerate(image):     # ImageEnhance.Color: the grey image
    return pixels.grey_rgb(image)


def _contrast_degenerate(image):   # ImageEnhance.Contrast: the mean grey level, rounded
    return int(pixels.grey(image).mean() + 0.5)


_LEVELS = np.arange(256)


def _posterize(increasing):
    def op(image, level, rng):
        bits = 4 - int(level / _MAX_LEVEL * 4) if increasing else int(level / _MAX_LEVEL * 4)
        if bits >= 8:
            return image
        mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF     # bits 0 keeps nothing (black), as old PIL did
        return pixels.apply_lut(image, _LEVELS & mask)
    return op


def _solarize(increasing):
    def op(image, level, rng):
        threshold = 256 - int(level / _MAX_LEVEL * 256) if increasing else int(level / _MAX_LEVEL * 256)
        return pixels.apply_lut(image, np.where(_LEVELS < threshold, _LEVELS, 255 - _LEVELS))
    return op


def _solarize_add(image, level, rng):
    add = int(level / _MAX_LEVEL * 110)
    return pixels.apply_lut(image, np.where(_LEVELS < 128, np.minimum(255, _LEVELS + add), _LEVELS))


COLOR_OPS = {
    "AutoContrast": lambda image, level, rng: pixels.apply_lut(image, pixels.autocontrast_lut(image)),
    "Equalize": lambda image, level, rng: pixels.apply_lut(image, pixels.equalize_lut(image)),
    "Invert": lambda image, level, rng: pixels.apply_lut(image, 255 - _LEVELS),
    "Posterize": _posterize(False), "PosterizeIncreasing": _posterize(True),
    "Solarize": _solarize(False), "SolarizeIncreasing": _solarize(True),
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(_colour_degenerate, False), "ColorIncreasing": _enhance(_colour_degenerate, True),
    "Contrast": _enhance(_contrast_degenerate, False), "ContrastIncreasing": _enhance(_contrast_degenerate, True),
    "Brightness": _enhance(lambda image: 0, False), "BrightnessIncreasing": _enhance(lambda image: 0, True),
    "Sharpness": _enhance(pixels.smooth, False), "SharpnessIncreasing": _enhance(pixels.smooth, True),
}

# timm's op lists for RandAugment (inc0 / inc1)
_OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
        "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
_OPS_INCREASING = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                   "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                   "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


def parse_rand_config(config_str):
    """'rand-m9-mstd0.5-inc1' -> dict(num_ops=2, magnitude=9.0, magnitude_std=0.5, magnitude_max=10.0,
    prob=0.5, increasing=True). Keys: m, n, mstd, mmax, p, inc."""
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"RandAugment.config_str '{config_str}' must start with 'rand-' (e.g. rand-m9-mstd0.5-inc1)")
    out = dict(num_ops=2, magnitude=9.0, magnitude_std=0.0, magnitude_max=_MAX_LEVEL, prob=0.5, increasing=False)
    keys = (("mstd", "magnitude_std", float), ("mmax", "magnitude_max", float), ("inc", "increasing", bool),
            ("m", "magnitude", float), ("n", "num_ops", int), ("p", "prob", float))
    for part in parts[1:]:
        for prefix, name, kind in keys:
            if part.startswith(prefix):
                try:
                    value = float(part[len(prefix):])
                except ValueError:
                    raise ConfigError(f"RandAugment.config_str '{config_str}': cannot read '{part}'") from None
                out[name] = bool(value) if kind is bool else kind(value)
                break
        else:
            raise ConfigError(f"RandAugment.config_str '{config_str}': unknown part '{part}' "
                              "(known: m<magnitude>, n<ops>, mstd<std>, mmax<max>, p<prob>, inc<0|1>)")
    for name, valid in _CONFIG_RANGES.items():
        if not (valid.contains(out[name]) or name == "magnitude_std" and out[name] == math.inf):
            raise ConfigError(f"RandAugment.config_str '{config_str}': {name} must be {valid.describe()}, "
                              f"got {out[name]}")
    return out


# what the numbers of a config string may be (mstd may also be inf: magnitudes uniform in [0, m], as timm)
_CONFIG_RANGES = {"num_ops": Range(0, kind=int), "magnitude": Range(0), "magnitude_std": Range(0),
                  "magnitude_max": Range(0, low_open=True), "prob": Range(0, 1)}


@TRANSFORMS.register()
class RandAugment(Transform):
    """timm-style RandAugment on image + label map.

    config_str: e.g. 'rand-m9-mstd0.5-inc1' (LV-ViT S/M/T), 'rand-n3-m9-mstd0.5-inc1' (L).
    ops: restrict to these op names (null: timm's 15 ops). fill: RGB outside geometric ops
    (timm uses the ImageNet mean). interpolation: for geometric ops, 'random' = bilinear or bicubic.
    crop_window: when a RandomResizedCrop follows, compute geometric ops only over the part of the
    image the crop will use (same pixels as the whole image, ~2x less work on average).
    """

    def __init__(self, config_str: str = "rand-m9-mstd0.5-inc1", ops: list = None,
                 fill: ranged(list, 0, 255, kind=int, length=3) = (124, 116, 104),
                 interpolation: str = "random", crop_window: bool = True, enable: bool = True):
        super().__init__(enable)
        self.crop_window = crop_window
        params = parse_rand_config(config_str)
        _check_interpolation(interpolation, "RandAugment")
        self.config_str, self.fill, self.interpolation = config_str, tuple(int(v) for v in fill), interpolation
        self.num_ops, self.prob = params["num_ops"], params["prob"]
        self.magnitude, self.magnitude_std = params["magnitude"], params["magnitude_std"]
        self.magnitude_max = params["magnitude_max"]
        names = list(ops) if ops is not None else (_OPS_INCREASING if params["increasing"] else _OPS)
        unknown = [n for n in names if n not in GEOMETRIC_OPS and n not in COLOR_OPS]
        if unknown:
            raise ConfigError(f"RandAugment.ops: unknown op(s) {', '.join(unknown)}; "
                              f"known: {', '.join(list(GEOMETRIC_OPS) + list(COLOR_OPS))}")
        self.ops = names

    def _level(self, rng):
        level = self.magnitude
        if self.magnitude_std == math.inf:
            level = rng.uniform(0.0, level)
        elif self.magnitude_std > 0:
            level = rng.normal(level, self.magnitude_std)
        return min(max(level, 0.0), self.magnitude_max)

    def apply(self, sample, rng):
        steps = []                      # (name, level, pixel-index matrix or None, interpolation)
        for name in rng.choice(self.ops, self.num_ops, replace=True):
            if rng.random() >= self.prob:
                continue
            level = self._level(rng)
            if name in GEOMETRIC_OPS:
                matrix, inverse = pixels.centre_matrix(GEOMETRIC_OPS[name](sample.image, level, rng))
                steps.append((name, level, (matrix, inverse), interpolation_name(self.interpolation, rng)))
            else:
                steps.append((name, level, None, None))
        if not steps:
            return sample
        windows, precrop = self._windows(sample, steps) if self.crop_window else (None, None)
        full_size = _size(sample.image)
        image, origin = pixels.as_array(sample.image), (0, 0)
        for index, (name, level, affine, interpolation) in enumerate(steps):
            if precrop is not None and index == precrop[0]:
                # colour ops from here on only need the crop's neighbourhood (point ops, Sharpness +2 px)
                x0, y0, x1, y1 = precrop[1]
                image, origin = np.ascontiguousarray(image[y0:y1, x0:x1]), (x0, y0)
            if affine is None:
                image = COLOR_OPS[name](image, level, rng)
                continue
            matrix, inverse = affine
            warp_label_map(sample, inverse)   # in full-image coordinates (sample.image is still full)
            if windows is None or windows[index] is None:
                image = pixels.warp_affine(image, matrix, full_size, interpolation, self.fill)
                continue
            # compute only the output window: window pixel (x, y) is full-image pixel (x + wx0, y + wy0),
            # whose source pixel is read from the current image, which starts at `origin`
            wx0, wy0, wx1, wy1 = windows[index]
            shifted = matrix.copy()
            shifted[:, 2] += matrix[:, 0] * wx0 + matrix[:, 1] * wy0 - np.array(origin, np.float64)
            image = pixels.warp_affine(image, shifted, (wx1 - wx0, wy1 - wy0), interpolation, self.fill)
            origin = (wx0, wy0)
        size = _size(image)
        if origin != (0, 0) or size != full_size:
            sample.view = sample.view_from_pixels((origin[0], origin[1], origin[0] + size[0], origin[1] + size[1]))
        sample.image = image
        return sample

    def _windows(self, sample, steps):
        """Per step, the full-image pixel box its output must cover so that a planned crop comes out
        exactly as if every op had run on the whole image; None where a step runs on the whole image.
        Also ``precrop``: None, or (step index, box) when that step is a colour op and the image can be
        cut to ``box`` before it.

        Only after the last op that needs whole-image statistics (AutoContrast, Equalize, Contrast).
        Boxes grow backwards through each op: a geometric op needs the bounding box of its output's
        source points (+3 px for bicubic), Sharpness +2 px (3x3 filter), and the crop's resize filter
        needs 2 x its scale factor.
        """
        plan = sample.plans.get("crop")
        global_ops = [i for i, step in enumerate(steps) if step[0] in _GLOBAL_OPS]
        first = global_ops[-1] + 1 if global_ops else 0
        if plan is None or first >= len(steps):
            return None, None
        width, height = _size(sample.image)
        box, out_size = plan
        x0, y0, x1, y1 = sample.pixels_from_view(box)
        margin = math.ceil(2 * max(1.0, (x1 - x0) / out_size, (y1 - y0) / out_size)) + 2
        window = (x0 - margin, y0 - margin, x1 + margin, y1 + margin)
        windows = [None] * len(steps)
        for index in range(len(steps) - 1, first - 1, -1):
            window = _clip_box(window, width, height)
            windows[index] = window
            name, _, affine, _ = steps[index]
            if affine is not None:
                a, b, c, d, e, f = affine[1]
                xs = [a * x + b * y + c for x in window[0::2] for y in window[1::2]]
                ys = [d * x + e * y + f for x in window[0::2] for y in window[1::2]]
                window = (min(xs) - 3, min(ys) - 3, max(xs) + 3, max(ys) + 3)
            elif name.startswith("Sharpness"):
                window = (window[0] - 2, window[1] - 2, window[2] + 2, window[3] + 2)
        precrop = None
        if steps[first][2] is None:   # a colour op: cut the image to the input it needs
            box = _clip_box(window, width, height)
            precrop = (first, box) if box != (0, 0, width, height) else None
        if windows[first] == (0, 0, width, height) and precrop is None:
            return None, None
        return windows, precrop


def _clip_box(box, width, height):
    """Round a float box outwards to whole pixels inside the image (at least 1 x 1)."""
    x0 = min(width - 1, max(0, int(math.floor(box[0]))))
    y0 = min(height - 1, max(0, int(math.floor(box[1]))))
    return (x0, y0, max(x0 + 1, min(width, int(math.ceil(box[2])))), max(y0 + 1, min(height, int(math.ceil(box[3])))))
