"""OpenCV pixel kernels against the PIL ops they replace: identical tables, bounded rounding, same geometry."""
import os

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from passl.data import pixels
from passl.data.randaugment import COLOR_OPS


def photo(seed=0, size=(96, 72)):
    """A smooth photo-like RGB image with edges and noise, uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels_ = np.asarray(field, np.float64) + rng.normal(0, 8, (size[1], size[0], 3))
    pixels_[size[1] // 3: size[1] // 2, size[0] // 4: size[0] // 2] = (250, 20, 90)
    return np.clip(pixels_, 0, 255).astype(np.uint8)


IMAGES = [photo(0), photo(1), np.full((20, 30, 3), 77, np.uint8),                      # flat: degenerate tables
          (np.random.default_rng(2).random((40, 50, 3)) * 60 + 100).astype(np.uint8)]  # low contrast


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_table_ops_equal_pil(index):
    image = IMAGES[index]
    pil = Image.fromarray(image)
    cases = {"AutoContrast": ImageOps.autocontrast(pil), "Equalize": ImageOps.equalize(pil),
             "Invert": ImageOps.invert(pil), "Solarize": ImageOps.solarize(pil, 256 - int(6 / 10 * 256)),
             "Posterize": pil.point([i & 0xF0 for i in range(256)] * 3)}
    ops = {"AutoContrast": 0, "Equalize": 0, "Invert": 0, "Solarize": 6.0, "Posterize": 2.0}
    for name, want in cases.items():
        op = COLOR_OPS[name if name not in ("Solarize", "Posterize") else name + "Increasing"]
        got = op(image.copy(), ops[name], np.random.default_rng(0))
        np.testing.assert_array_equal(got, np.asarray(want), err_msg=name)


@pytest.mark.parametrize("kind", ["Color", "Contrast", "Brightness", "Sharpness"])
def test_enhance_ops_within_two_levels_of_pil(kind):
    enhancers = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                 "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    worst = 0
    for image in IMAGES:
        for level in (0.0, 3.0, 7.0, 10.0):
            factor = level / 10 * 1.8 + 0.1                      # the non-increasing variant's factor
            got = COLOR_OPS[kind](image.copy(), level, None)
            want = np.asarray(enhancers[kind](Image.fromarray(image)).enhance(factor))
            worst = max(worst, int(np.abs(got.astype(int) - want).max()))
    assert worst <= 2, worst


def test_affine_warp_has_pil_geometry():
    """A bilinear warp with OpenCV shows the same image content as PIL's: in the interior, 99.9% of the
    pixels within 2 levels (all of them with OpenCV 5; 4.x quantises the weights to 1/32 px: up to 4), on
    average +0.5 (OpenCV rounds to nearest, PIL rounds down), nothing else systematic."""
    image = photo(3, (120, 90))
    rng = np.random.default_rng(0)
    for _ in range(10):
        angle = np.radians(rng.uniform(-30, 30))
        inverse = (np.cos(angle), np.sin(angle), rng.uniform(-10, 10), -np.sin(angle), np.cos(angle), rng.uniform(-10, 10))
        matrix, rounded = pixels.centre_matrix(inverse)
        got = pixels.warp_affine(image, matrix, (120, 90), "bilinear", (0, 0, 0)).astype(int)
        want = np.asarray(Image.fromarray(image).transform((120, 90), Image.AFFINE, rounded, Image.BILINEAR)).astype(int)
        ys, xs = np.mgrid[0:90, 0:120]
        a, b, c, d, e, f = rounded
        src_x, src_y = a * (xs + .5) + b * (ys + .5) + c, d * (xs + .5) + e * (ys + .5) + f
        interior = (src_x > 2) & (src_x < 118) & (src_y > 2) & (src_y < 88)
        diff = (got - want)[interior]
        assert np.mean(np.abs(diff) <= 2) > 0.999 and np.abs(diff).max() <= 4 and 0.3 < diff.mean() < 0.6


def test_centre_matrix_rounds_to_1024ths_and_inverts_consistently():
    inverse = (0.9659, 0.2588, -12.3456, -0.2588, 0.9659, 7.891)
    matrix, rounded = pixels.centre_matrix(inverse)
    assert np.all(matrix * 1024 == np.round(matrix * 1024))
    assert np.allclose(rounded, inverse, atol=1 / 1024)
    # the two describe one map: pixel-index point p <-> continuous point p + 0.5
    x, y = 17.0, 33.0
    a, b, c, d, e, f = rounded
    assert np.allclose(matrix @ [x, y, 1], [a * (x + .5) + b * (y + .5) + c - .5, d * (x + .5) + e * (y + .5) + f - .5])


@pytest.mark.parametrize("box,size,within", [
    ((10, 5, 58, 53), 96, 1.0),                  # enlarging: the same bilinear filter
    ((0, 0, 96, 72), 32, 2.0),                   # shrinking >= 2x: area filter vs PIL's widened bilinear
    ((0, 0, 96, 72), 48, 3.0),                   # shrinking < 2x: bilinear without PIL's widening (aliasing)
    ((12.5, 3.25, 60.5, 51.25), 64, 1.0)])       # a fractional box (draft-decoded image)
def test_resize_box_matches_pil_geometry(box, size, within):
    image = photo(4)
    got = pixels.resize_box(image, box, size, "bilinear").astype(int)
    want = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box)).astype(int)
    diff = got - want
    assert np.abs(diff).mean() < within and abs(diff.mean()) < 0.5, (np.abs(diff).mean(), diff.mean())


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_decode_equals_pil(tmp_path, scale, mode):
    """OpenCV's decode gives PIL's pixels, at PIL's draft reductions."""
    import io
    buffer = io.BytesIO()
    Image.fromarray(photo(5, (208, 160))).convert(mode).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as img:
        if scale > 1:
            img.draft("RGB", (208 // scale, 160 // scale))
        want = np.asarray(img.convert("RGB"))
    assert want.shape == (160 // scale, 208 // scale, 3)
    np.testing.assert_array_equal(pixels.decode_jpeg(data, scale), want)


def test_truncated_jpeg_is_still_an_error(tmp_path):
    from passl.data.datasets import BadImageError, ImageFolder
    os.makedirs(tmp_path / "c")
    Image.fromarray(photo(6)).save(tmp_path / "c" / "x.jpg", quality=90)
    data = (tmp_path / "c" / "x.jpg").read_bytes()
    (tmp_path / "c" / "x.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(BadImageError, match="x.jpg.*truncated"):
        ImageFolder(str(tmp_path)).load(0)
