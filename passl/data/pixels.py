"""Pixel kernels of the training transforms on uint8 [H, W, 3] RGB arrays, with OpenCV.

JPEGs are decoded here (libjpeg-turbo, as in PIL, straight into an array); the evaluation resizes
stay with PIL (the published models were evaluated with PIL's bicubic); the training augmentations
run here, where OpenCV's SIMD kernels on one array avoid PIL's per-op image copies. Measured on one worker with
``benchmarks/bench_data.py`` (table in benchmarks/README.md).

Where the result differs from the PIL op it replaces (checked in tests/data/test_pixels.py):
- affine warps: OpenCV's bicubic uses a = -0.75 (PIL -0.5) and blends the fill colour into the
  border pixels' taps; bilinear: at most 2 levels (OpenCV 4.x, whose weights are quantised to 1/32
  px: 99.9% of pixels, a few up to 4);
- resizes: shrinking by 2x or more uses OpenCV's area filter, anything else bilinear or bicubic as
  asked, without PIL's widening of the filter when shrinking by less than 2x (RandomResizedCrop on
  ImageNet-sized images mostly enlarges or shrinks by under 2x);
- Color, Contrast, Brightness, Sharpness: OpenCV's grey weights and 3 x 3 filter rounding: at most
  2 levels;
- warps round to the nearest level where PIL rounds down: +0.5 level on average;
- AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd: identical (the same tables).
The geometry (where each output pixel comes from) is the same as PIL's, so label maps stay aligned.

OpenCV runs one thread here: a loader runs one process per worker, which is where the parallelism is.
"""
import numpy as np

__all__ = ["decode_jpeg", "as_array", "centre_matrix", "warp_affine", "resize_box", "flip", "apply_lut", "blend", "grey", "grey_rgb",
           "smooth", "autocontrast_lut",
           "equalize_lut", "LINEAR", "CUBIC"]

LINEAR, CUBIC = "bilinear", "bicubic"
_cv2 = None


def _cv():
    global _cv2
    if _cv2 is None:
        import cv2
        cv2.setNumThreads(1)
        _cv2 = cv2
    return _cv2


def decode_jpeg(data, scale=1):
    """uint8 [H, W, 3] RGB of the JPEG bytes ``data``, shrunk by ``scale`` (1, 2, 4, 8) in the decoder
    (libjpeg's DCT scaling, as PIL's draft mode), EXIF orientation ignored (as PIL does). Equal to
    PIL's decode of the same file (checked in tests/data/test_pixels.py)."""
    cv2 = _cv()
    reduced = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
               8: cv2.IMREAD_REDUCED_GRAYSCALE_8}[scale]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), reduced | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError("OpenCV cannot decode it")
    return image


def as_array(image):
    """uint8 [H, W, 3] of a PIL RGB image (or the array itself)."""
    return image if isinstance(image, np.ndarray) else np.asarray(image)


def _interpolation(name):
    cv2 = _cv()
    return cv2.INTER_CUBIC if name == CUBIC else cv2.INTER_LINEAR


def centre_matrix(inverse):
    """PIL's affine ``inverse`` (a, b, c, d, e, f): output point (x, y) -> input point (a x + b y + c, ...),
    in continuous coordinates (pixel i spans [i, i + 1)) -> the same map between pixel indices (OpenCV's
    convention), float64 [2, 3], every entry rounded to a multiple of 1/1024, and the PIL ``inverse``
    of that rounded map. Rounded entries make every sum OpenCV forms exact (coordinates < 8192), so a
    warp computed over a window of the output equals the same pixels of the whole warp. The rounding
    moves a point (x, y) by at most (|x| + |y| + 1) / 2048 px (0.43 px at the far corner of a 500 x 375
    image: a rotation 0.03 degrees off); the label map is moved by the returned inverse, so it stays
    exactly aligned with the image."""
    a, b, c, d, e, f = inverse
    matrix = np.array([[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]], np.float64)
    matrix = np.round(matrix * 1024.0) / 1024.0
    (a, b, c), (d, e, f) = matrix
    return matrix, (a, b, c - 0.5 * (a + b) + 0.5, d, e, f - 0.5 * (d + e) + 0.5)


def warp_affine(image, matrix, size, interpolation, fill):
    """Output ``size`` (w, h) whose pixel (x, y) shows input pixel ``matrix`` @ (x, y, 1) (float64 [2, 3],
    pixel indices; see ``centre_matrix``), ``fill`` where that lies outside the input."""
    cv2 = _cv()
    return cv2.warpAffine(image, matrix, (int(size[0]), int(size[1])),
                          flags=_interpolation(interpolation) | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(int(v) for v in fill))


def resize_box(image, box, size, interpolation):
    """The pixel box (x0, y0, x1, y1) of ``image`` resized to ``size`` x ``size`` (PIL's resize(box=...)
    geometry: output pixel centre x + 0.5 samples x0 + (x + 0.5) (x1 - x0) / size)."""
    cv2 = _cv()
    x0, y0, x1, y1 = box
    whole = [int(round(v)) for v in box]
    if all(abs(v - w) < 1e-6 for v, w in zip(box, whole)):
        region = image[whole[1]:whole[3], whole[0]:whole[2]]
        # the area filter only where it matters (>= 2x smaller): it costs ~7x a bilinear resize
        shrink = region.shape[1] >= 2 * size and region.shape[0] >= 2 * size
        method = cv2.INTER_AREA if shrink else _interpolation(interpolation)
        return cv2.resize(region, (size, size), interpolation=method)
    sx, sy = (x1 - x0) / size, (y1 - y0) / size
    matrix = np.array([[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]], np.float64)
    return cv2.warpAffine(image, matrix, (size, size), flags=_interpolation(interpolation) | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def apply_lut(image, table):
    """Table lookup: ``table`` uint8 [256] for every channel, or [256, 3] one per channel."""
    table = np.asarray(table, np.uint8)
    return _cv().LUT(image, table.reshape(256, 1, 3) if table.ndim == 2 else table)


def blend(image, degenerate, factor):
    """degenerate + factor (image - degenerate), clipped to 0..255 and rounded down (as PIL's Image.blend).
    ``degenerate``: an image like ``image``, or one grey level."""
    cv2, factor = _cv(), float(factor)
    # OpenCV rounds to nearest; - 0.499 rounds down except within 0.001 below an integer
    if np.isscalar(degenerate):
        return cv2.addWeighted(image, factor, image, 0.0, float(degenerate) * (1.0 - factor) - 0.499)
    return cv2.addWeighted(image, factor, degenerate, 1.0 - factor, -0.499)


def flip(image):
    """Mirror left-right (a copy)."""
    return _cv().flip(image, 1)


def grey_rgb(image):
    """The luma of ``image`` in all three channels."""
    cv2 = _cv()
    return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def grey(image):
    """uint8 [H, W] luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B)."""
    cv2 = _cv()
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def smooth(image):
    """PIL's ImageFilter.SMOOTH (3 x 3, centre 5/13), the outermost pixels kept as they are."""
    out = _cv().filter2D(image, -1, _SMOOTH)
    out[0], out[-1], out[:, 0], out[:, -1] = image[0], image[-1], image[:, 0], image[:, -1]
    return out


def _histograms(image):
    cv2 = _cv()
    return [cv2.calcHist([image], [c], None, [256], [0, 256]).ravel().astype(np.int64) for c in range(3)]


def autocontrast_lut(image):
    """uint8 [256, 3]: PIL's ImageOps.autocontrast (no cutoff) per channel: lowest level -> 0, highest -> 255."""
    tables = []
    levels = np.arange(256)
    for hist in _histograms(image):
        used = np.flatnonzero(hist)
        lo, hi = (used[0], used[-1]) if used.size else (0, 0)
        if hi <= lo:
            tables.append(levels)
            continue
        scale = 255.0 / (hi - lo)
        tables.append(np.clip((levels * scale - lo * scale).astype(np.int64), 0, 255))
    return np.stack(tables, 1).astype(np.uint8)


def equalize_lut(image):
    """uint8 [256, 3]: PIL's ImageOps.equalize per channel (the same integer steps)."""
    tables = []
    for hist in _histograms(image):
        used = hist[hist > 0]
        step = (int(used.sum()) - int(used[-1])) // 255 if used.size > 1 else 0
        if not step:
            tables.append(np.arange(256))
            continue
        before = np.concatenate([[0], np.cumsum(hist)[:-1]])
        tables.append(np.minimum((step // 2 + before) // step, 255))
    return np.stack(tables, 1).astype(np.uint8)
