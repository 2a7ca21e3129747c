"""RandAugment configured by a timm-style string, moving the label map with every geometric op.

``rand-m9-mstd0.5-inc1`` means: ``n`` ops per image (default 2), each applied with probability ``p``
(default 0.5), magnitude ~ N(m, mstd) clipped to [0, mmax] (default 10) drawn per op, ``inc1``
selects the variants whose strength grows with the magnitude. Colour ops change the image only;
Rotate, ShearX/Y and TranslateX/YRel apply one affine transform to the image (PIL, random bilinear
or bicubic, ``fill`` outside) and to the label map (nearest at the map's own resolution, scores 0
outside) -- see ``transforms.warp_label_map``.
"""
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from passl.data.transforms import Transform, _check_interpolation, pil_interpolation, warp_label_map
from passl.errors import ConfigError
from passl.registry import TRANSFORMS

__all__ = ["RandAugment", "parse_rand_config", "GEOMETRIC_OPS", "COLOR_OPS"]

_MAX_LEVEL = 10.0
_TRANSLATE_PCT = 0.45
_SOLARIZE_ADD_LUT = {}


def _signed(value, rng):
    return -value if rng.random() < 0.5 else value


# -- geometric ops: return the inverse affine (output pixel -> input pixel), PIL's convention ----------

def _rotate(image, level, rng):
    degrees = _signed(level / _MAX_LEVEL * 30.0, rng)
    # the matrix PIL's Image.rotate builds: rotation by `degrees` anticlockwise about the centre
    angle = -math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = image.size[0] / 2.0, image.size[1] / 2.0
    return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def _shear_x(image, level, rng):
    return (1.0, _signed(level / _MAX_LEVEL * 0.3, rng), 0.0, 0.0, 1.0, 0.0)


def _shear_y(image, level, rng):
    return (1.0, 0.0, 0.0, _signed(level / _MAX_LEVEL * 0.3, rng), 1.0, 0.0)


def _translate_x(image, level, rng):
    return (1.0, 0.0, _signed(level / _MAX_LEVEL * _TRANSLATE_PCT, rng) * image.size[0], 0.0, 1.0, 0.0)


def _translate_y(image, level, rng):
    return (1.0, 0.0, 0.0, 0.0, 1.0, _signed(level / _MAX_LEVEL * _TRANSLATE_PCT, rng) * image.size[1])


GEOMETRIC_OPS = {"Rotate": _rotate, "ShearX": _shear_x, "ShearY": _shear_y,
                 "TranslateXRel": _translate_x, "TranslateYRel": _translate_y}


# -- colour ops: image -> image ---------------------------------------------------------------------

def _enhance(kind, increasing):
    def op(image, level, rng):
        if increasing:
            factor = 1.0 + _signed(level / _MAX_LEVEL * 0.9, rng)
        else:
            factor = level / _MAX_LEVEL * 1.8 + 0.1
        return kind(image).enhance(factor)
    return op


def _posterize(increasing):
    def op(image, level, rng):
        bits = 4 - int(level / _MAX_LEVEL * 4) if increasing else int(level / _MAX_LEVEL * 4)
        if bits >= 8:
            return image
        mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF     # bits 0 keeps nothing (black), as old PIL did
        return image.point([i & mask for i in range(256)] * 3)
    return op


def _solarize(increasing):
    def op(image, level, rng):
        threshold = 256 - int(level / _MAX_LEVEL * 256) if increasing else int(level / _MAX_LEVEL * 256)
        return ImageOps.solarize(image, threshold)
    return op


def _solarize_add(image, level, rng):
    add = int(level / _MAX_LEVEL * 110)
    if add not in _SOLARIZE_ADD_LUT:
        _SOLARIZE_ADD_LUT[add] = [min(255, i + add) if i < 128 else i for i in range(256)] * 3
    return image.point(_SOLARIZE_ADD_LUT[add])


COLOR_OPS = {
    "AutoContrast": lambda image, level, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, rng: ImageOps.equalize(image),
    "Invert": lambda image, level, rng: ImageOps.invert(image),
    "Posterize": _posterize(False), "PosterizeIncreasing": _posterize(True),
    "Solarize": _solarize(False), "SolarizeIncreasing": _solarize(True),
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color, False), "ColorIncreasing": _enhance(ImageEnhance.Color, True),
    "Contrast": _enhance(ImageEnhance.Contrast, False), "ContrastIncreasing": _enhance(ImageEnhance.Contrast, True),
    "Brightness": _enhance(ImageEnhance.Brightness, False),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness, True),
    "Sharpness": _enhance(ImageEnhance.Sharpness, False),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness, True),
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
    return out


@TRANSFORMS.register()
class RandAugment(Transform):
    """timm-style RandAugment on image + label map.

    config_str: e.g. 'rand-m9-mstd0.5-inc1' (LV-ViT S/M/T), 'rand-n3-m9-mstd0.5-inc1' (L).
    ops: restrict to these op names (null: timm's 15 ops). fill: RGB outside geometric ops
    (timm uses the ImageNet mean). interpolation: for geometric ops, 'random' = bilinear or bicubic.
    """

    def __init__(self, config_str: str = "rand-m9-mstd0.5-inc1", ops: list = None, fill: list = (124, 116, 104),
                 interpolation: str = "random", enable: bool = True):
        super().__init__(enable)
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
        for name in rng.choice(self.ops, self.num_ops, replace=True):
            if rng.random() >= self.prob:
                continue
            level = self._level(rng)
            if name in GEOMETRIC_OPS:
                inverse = GEOMETRIC_OPS[name](sample.image, level, rng)
                resample = pil_interpolation(self.interpolation, rng)
                sample.image = sample.image.transform(sample.image.size, Image.AFFINE, inverse, resample,
                                                      fillcolor=self.fill)
                warp_label_map(sample, inverse)
            else:
                sample.image = COLOR_OPS[name](sample.image, level, rng)
        return sample
