"""Label-aware transforms: the map follows the image exactly; timm-style RandAugment strings."""
import numpy as np
import pytest
from PIL import Image

from passl.data.randaugment import GEOMETRIC_OPS, RandAugment, parse_rand_config
from passl.data.transforms import (CenterCrop, Normalize, RandomErasing, RandomHorizontalFlip, RandomResizedCrop,
                                   ResizeShorter, Sample, warp_label_map)
from passl.errors import ConfigError


def class_image_and_map(width=132, height=88, cells=(8, 12)):
    """A map whose every cell has its own class, and an image whose pixels carry the class of the
    cell they lie in (as a 'L' image), for a full-coverage map. Cells are 11 px, so each cell
    centre is a pixel centre, where PIL samples."""
    rows, cols = cells
    label_map = np.zeros((2, 1, rows, cols), np.float32)
    label_map[0] = 1.0
    label_map[1, 0] = np.arange(rows * cols).reshape(rows, cols) + 1      # classes 1..96, 0 = nothing
    ys, xs = np.mgrid[0:height, 0:width]
    cls = label_map[1, 0][((ys + 0.5) * rows / height).astype(int), ((xs + 0.5) * cols / width).astype(int)]
    return Image.fromarray(cls.astype(np.uint8), "L"), label_map


@pytest.mark.parametrize("op", sorted(GEOMETRIC_OPS))
def test_warped_map_matches_the_warped_image(op):
    """Warp a class image with the op's affine (nearest): at every map cell centre it shows the
    class the warped map holds there."""
    rng = np.random.default_rng(0)
    for trial in range(5):
        image, label_map = class_image_and_map()
        sample = Sample(image=image, label_map=label_map.copy())
        inverse = GEOMETRIC_OPS[op](image, 7.0, rng)
        warped_image = np.asarray(image.transform(image.size, Image.AFFINE, inverse, Image.NEAREST, fillcolor=0))
        warp_label_map(sample, inverse)
        rows, cols = sample.label_map.shape[2:]
        assert (rows, cols) == (8, 12)     # full coverage: no padding needed
        ys = ((np.arange(rows) + 0.5) * 88 / rows).astype(int)
        xs = ((np.arange(cols) + 0.5) * 132 / cols).astype(int)
        seen = warped_image[ys[:, None], xs[None, :]]
        got = np.where(sample.label_map[1, 0] < 0, 0, sample.label_map[1, 0])
        assert np.mean(seen == got) >= 0.99, f"{op} trial {trial}"
        assert np.all(sample.label_map[0, 0][got == 0] == 0)   # outside: scores 0


def test_rotate_uses_pil_rotate_matrix():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    rng = np.random.default_rng(3)
    inverse = GEOMETRIC_OPS["Rotate"](image, 5.0, rng)
    sign = -1 if np.random.default_rng(3).random() < 0.5 else 1
    mine = image.transform(image.size, Image.AFFINE, inverse, Image.NEAREST)
    pil = image.rotate(sign * 15.0, Image.NEAREST)
    assert np.mean(np.asarray(mine) == np.asarray(pil)) > 0.999


def test_centre_square_map_is_padded_before_warping():
    """Content rotated out of the centre square keeps its labels on empty-padded cells."""
    image = Image.new("RGB", (200, 100))
    label_map = np.ones((2, 1, 4, 4), np.float32)
    sample = Sample(image=image, label_map=label_map, map_region=(50, 0, 150, 100))
    warp_label_map(sample, (1, 0, 40.0, 0, 1, 0))           # shift content 40 px to the left
    x0, _, x1, _ = sample.map_region
    assert x0 <= 0 and x1 >= 200 and sample.label_map.shape[3] == 8
    filled = sample.label_map[1, 0, 0] >= 0
    cell = 25.0
    centres = x0 + (np.arange(8) + 0.5) * cell
    np.testing.assert_array_equal(filled, (centres + 40 >= 50) & (centres + 40 < 150))


def test_flip_moves_the_map_exactly_when_the_image_flips():
    base = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4).repeat(10, 0).repeat(10, 1)).convert("RGB")
    label_map = np.zeros((2, 1, 3, 4), np.float32)
    label_map[1, 0] = np.arange(12).reshape(3, 4)
    flips = 0
    for seed in range(40):
        sample = Sample(image=base.copy(), label_map=label_map.copy(), map_region=(0, 0, 40, 30))
        sample = RandomHorizontalFlip(prob=0.5)(sample, np.random.default_rng(seed))
        image_flipped = np.asarray(sample.image)[0, 0, 0] == 3
        map_flipped = sample.label_map[1, 0, 0, 0] == 3
        assert image_flipped == map_flipped
        flips += image_flipped
    assert 10 < flips < 30


def test_flip_reflects_a_centre_square_region_about_the_view():
    sample = Sample(image=Image.new("RGB", (200, 100)), label_map=np.zeros((2, 1, 2, 2), np.float32),
                    map_region=(20, 0, 120, 100))
    RandomHorizontalFlip(prob=1.0)(sample, np.random.default_rng(0))
    assert sample.map_region == (80, 0, 180, 100)


def test_parse_rand_config():
    assert parse_rand_config("rand-m9-mstd0.5-inc1") == dict(num_ops=2, magnitude=9.0, magnitude_std=0.5,
                                                              magnitude_max=10.0, prob=0.5, increasing=True)
    assert parse_rand_config("rand-n3-m9-mstd0.5-inc1")["num_ops"] == 3
    with pytest.raises(ConfigError, match="unknown part 'x7'"):
        parse_rand_config("rand-m9-x7")
    with pytest.raises(ConfigError, match="start with 'rand-'"):
        parse_rand_config("auto-m9")
    assert len(RandAugment("rand-m9-mstd0.5-inc1").ops) == 15
    assert "PosterizeIncreasing" in RandAugment("rand-m9-mstd0.5-inc1").ops
    with pytest.raises(ConfigError, match="Spin"):
        RandAugment(ops=["Spin"])


def test_randaugment_runs_every_op_at_every_magnitude():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    for magnitude in (0, 5, 10):
        ra = RandAugment(f"rand-n15-m{magnitude}-p1.0-inc1")
        ra.ops = list(ra.ops)
        for name in ra.ops:
            one = RandAugment(f"rand-n1-m{magnitude}-p1.0-inc1", ops=[name])
            sample = one(Sample(image=image.copy(), label_map=np.ones((2, 1, 3, 4), np.float32)),
                         np.random.default_rng(0))
            assert sample.image.shape == (30, 40, 3) and sample.image.dtype == np.uint8   # RGB
            assert sample.label_map.shape[:2] == (2, 1)


def test_random_resized_crop_sets_the_view_and_size():
    sample = Sample(image=Image.new("RGB", (300, 200)))
    rng = np.random.default_rng(0)
    sample = RandomResizedCrop(size=48)(sample, rng)
    x0, y0, x1, y1 = sample.view
    assert sample.image.shape == (48, 48, 3)
    assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200
    assert 0.08 * 300 * 200 * 0.99 <= (x1 - x0) * (y1 - y0) <= 300 * 200
    assert 3 / 4 - 0.05 <= (x1 - x0) / (y1 - y0) <= 4 / 3 + 0.05


def test_eval_resize_and_centre_crop():
    sample = Sample(image=Image.new("RGB", (300, 200)))
    sample = ResizeShorter(size=64, crop_pct=0.875)(sample, None)
    assert sample.image.size == (109, 73)                 # shorter side int(64 / 0.875) = 73
    sample = CenterCrop(size=64)(sample, None)
    assert sample.image.size == (64, 64)
    x0, y0, x1, y1 = sample.view
    assert x1 - x0 == pytest.approx(64 * 300 / 109) and (x0 + x1) / 2 == pytest.approx(150, abs=2)


def test_normalize_on_a_sample_and_on_a_batch_agree():
    import paddle
    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    normalize = Normalize(mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4])
    want = ((pixels / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.3, 0.4])).transpose(2, 0, 1)
    np.testing.assert_allclose(normalize(Sample(image=Image.fromarray(pixels)), None).image, want, atol=1e-5)
    batch = paddle.to_tensor(np.stack([pixels.transpose(2, 0, 1)] * 2))            # uint8 [2, 3, 20, 30]
    got = normalize.normalize_batch(batch)
    assert got.dtype == paddle.float32
    np.testing.assert_allclose(got.numpy(), np.stack([want] * 2), atol=1e-5)


def _erased(mode, boxes, seed=7, shape=(2, 3, 20, 30)):
    import paddle
    images = paddle.full(shape, 5.0)     # a value no fill produces
    out = RandomErasing(mode=mode).erase_batch(images, boxes, seed).numpy()
    return out, out != 5.0


def test_random_erasing_draws_boxes_per_sample():
    pixels = np.zeros((20, 30, 3), np.uint8)
    areas = []
    for seed in range(50):
        sample = RandomErasing(prob=1.0)(Sample(image=Image.fromarray(pixels)), np.random.default_rng(seed))
        boxes = sample.erase
        top, left, h, w = boxes[0]
        assert boxes.shape == (1, 4) and boxes.dtype == np.int32
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 30
        areas.append(h * w)
    assert min(areas) >= 0.02 * 600 * 0.5 and max(areas) <= 600 / 3 + 30 and len(set(areas)) > 10
    never = RandomErasing(prob=0.0)(Sample(image=Image.fromarray(pixels)), np.random.default_rng(0))
    assert not never.erase.any()                                                # height 0: nothing erased
    assert RandomErasing(prob=1.0, enable=False)(Sample(image=Image.fromarray(pixels)),
                                                 np.random.default_rng(0)).erase is None


def test_random_erasing_fills_exactly_its_boxes_on_the_batch():
    boxes = np.array([[[2, 3, 4, 5]], [[0, 0, 0, 0]]], np.int32)                 # sample 1: no box
    out, changed = _erased("pixel", boxes)
    want = np.zeros((2, 3, 20, 30), bool)
    want[0, :, 2:6, 3:8] = True
    np.testing.assert_array_equal(changed, want)
    assert abs(out[0, :, 2:6, 3:8].mean()) < 1.0 and out[0, :, 2:6, 3:8].std() > 0.3   # normal noise
    again, _ = _erased("pixel", boxes)
    np.testing.assert_array_equal(again, out)                                   # the seed fixes the noise
    other, _ = _erased("pixel", boxes, seed=8)
    assert not np.array_equal(other, out)
    const, changed = _erased("const", boxes)
    np.testing.assert_array_equal(changed, want)
    assert (const[0, :, 2:6, 3:8] == 0).all()
    rand, changed = _erased("rand", boxes)
    np.testing.assert_array_equal(changed, want)
    assert all(np.unique(rand[0, c, 2:6, 3:8]).size == 1 for c in range(3))     # one colour per channel


def test_crop_window_gives_the_same_pixels_as_whole_image_ops():
    """RandAugment computing geometric ops only where the planned crop looks must not change a pixel."""
    pixels = np.random.default_rng(0).integers(0, 255, (75, 100, 3), dtype=np.uint8)
    smooth = Image.fromarray(pixels).resize((200, 150), Image.BICUBIC)
    label_map = np.random.default_rng(1).normal(size=(2, 2, 6, 6)).astype(np.float32)
    windowed_runs = 0
    for seed in range(60):
        outputs = []
        for window in (True, False):
            rng = np.random.default_rng(seed)
            sample = Sample(size=smooth.size)
            crop = RandomResizedCrop(size=32, scale=[0.05, 0.6])
            crop.plan(sample, rng)
            sample.image, sample.label_map = smooth.copy(), label_map.copy()
            sample = RandAugment("rand-n3-m9-mstd0.5-p0.8-inc1", crop_window=window)(sample, rng)
            windowed_runs += window and sample.image_size() != smooth.size
            sample = crop(sample, rng)
            outputs.append((np.asarray(sample.image), sample.label_map, sample.view))
        np.testing.assert_array_equal(outputs[0][0], outputs[1][0], err_msg=f"seed {seed}")
        np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
        np.testing.assert_allclose(outputs[0][2], outputs[1][2])
    assert windowed_runs >= 10


def test_random_erasing_overlapping_boxes_on_device_tensors():
    """Boxes as a device tensor (as the Loader hands them over); where two boxes overlap, the later one's
    colour fills ('rand'), each box one colour per channel; pixel noise covers the union exactly."""
    import paddle
    boxes = paddle.to_tensor(np.array([[[0, 0, 6, 6], [3, 3, 6, 6]], [[0, 0, 0, 0], [10, 20, 5, 5]]], np.int32))
    images = paddle.full((2, 3, 20, 30), 5.0)
    out = RandomErasing(mode="rand", max_count=2).erase_batch(images, boxes, 11).numpy()
    first_only = out[0][:, :3, :6]
    second = out[0][:, 3:9, 3:9]
    assert all(np.unique(first_only[c]).size == 1 and np.unique(second[c]).size == 1 for c in range(3))
    assert not np.array_equal(first_only[:, 0, 0], second[:, 0, 0])
    want = np.zeros((2, 3, 20, 30), bool)
    want[0, :, :6, :6] = want[0, :, 3:9, 3:9] = want[1, :, 10:15, 20:25] = True
    np.testing.assert_array_equal(out != 5.0, want)
    pixel = RandomErasing(mode="pixel", max_count=2).erase_batch(paddle.full((2, 3, 20, 30), 5.0), boxes, 11)
    np.testing.assert_array_equal(pixel.numpy() != 5.0, want)
