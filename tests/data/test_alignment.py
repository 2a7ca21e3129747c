"""End-to-end alignment: every token's target must name the region whose pixels the token shows.

Synthetic non-square images whose colour encodes position (red = x, green = y, blue 0) are cut into
a grid of regions, one class per region. Their label maps say, in every cell, which region lies
under the cell's centre (top-1), plus two other classes with lower scores. After flip, crop and each
geometric RandAugment op, the colour at a token's centre tells which region it shows, independently
of the pipeline's own geometry; the token target's argmax must agree for >= 95% of tokens.
"""
import os

import numpy as np
import pytest
from PIL import Image

from passl.data import build_dataset, expand_targets
from passl.data.label_maps import coverage_region
from passl.data.transforms import RandomHorizontalFlip

# region boundaries as fractions of width / height: irregular, so that no wrong geometry symmetric
# about the image centre maps them onto themselves, and on map-cell edges under both coverages
# (x = 99, 180 and y = 81 of 288 x 144), so that the maps themselves are exact
X_BOUNDS, Y_BOUNDS = (99 / 288, 180 / 288), (81 / 144,)
COLS, ROWS = len(X_BOUNDS) + 1, len(Y_BOUNDS) + 1
MAP_CELLS = 32                   # label map is MAP_CELLS x MAP_CELLS over its coverage
OUT, PATCH = 96, 16              # model input and token size -> 6 x 6 tokens
FILL = (0, 0, 255)               # RandAugment fill: blue marks pixels from outside the image
IMAGES = {"png": (288, 144), "jpg": (1152, 576)}   # the large JPEGs are draft-decoded


def region_of(x, y, width, height):
    """Class of the region at image point (x, y) (vectorised)."""
    col = np.searchsorted(np.array(X_BOUNDS) * width, x, side="right")
    row = np.searchsorted(np.array(Y_BOUNDS) * height, y, side="right")
    return (row * COLS + col).astype(np.int64)


def make_data(root, coverage, kind, count=6):
    width, height = IMAGES[kind]
    xs, ys = np.meshgrid((np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height)
    pixels = np.stack([xs * 255, ys * 255, np.zeros_like(xs)], -1).round().astype(np.uint8)
    x0, y0, x1, y1 = coverage_region(coverage, width, height)
    centres = (np.arange(MAP_CELLS) + 0.5) / MAP_CELLS
    cx, cy = np.meshgrid(x0 + centres * (x1 - x0), y0 + centres * (y1 - y0))
    top = region_of(cx, cy, width, height)
    rng = np.random.default_rng(0)
    for i in range(count):
        os.makedirs(os.path.join(root, "images", "c0"), exist_ok=True)
        os.makedirs(os.path.join(root, "maps", "c0"), exist_ok=True)
        name = f"img{i}"
        if kind == "png":
            Image.fromarray(pixels).save(os.path.join(root, "images", "c0", name + ".png"))
        else:
            Image.fromarray(pixels).save(os.path.join(root, "images", "c0", name + ".jpg"), quality=95)
        others = (top[None] + rng.integers(1, COLS * ROWS, size=(2,) + top.shape)) % (COLS * ROWS)
        others[1] = np.where(others[1] == others[0], (others[1] + 1) % (COLS * ROWS), others[1])
        others[1] = np.where(others[1] == top, (others[1] + 1) % (COLS * ROWS), others[1])
        label_map = np.zeros((2, 3, MAP_CELLS, MAP_CELLS), np.float16)
        label_map[0, 0], label_map[0, 1], label_map[0, 2] = 6.0, 1.0, 0.5
        label_map[1, 0], label_map[1, 1:] = top, others
        np.save(os.path.join(root, "maps", "c0", name + ".npy"), label_map)
    return width, height


def build(root, coverage, geometric_op=None, store_coverage=None):
    transforms = [{"name": "RandomHorizontalFlip", "prob": 0.5}]
    if geometric_op:
        transforms.append({"name": "RandAugment", "config_str": "rand-n1-m9-mstd0.5-p1.0", "ops": [geometric_op],
                           "fill": list(FILL)})
    transforms += [{"name": "RandomResizedCrop", "size": OUT, "scale": [0.08, 1.0]}]
    cfg = {"dataset": {"name": "ImageFolder", "root": os.path.join(root, "images")},
           "label_store": {"name": "npy", "root": os.path.join(root, "maps"),
                           "coverage": store_coverage or coverage},
           "transforms": transforms, "skip_bad_images": False}
    return build_dataset(cfg, "train", COLS * ROWS, (OUT // PATCH, OUT // PATCH))


def agreement(dataset, coverage, width, height, draws=60, transpose=False):
    """Share of checked tokens whose target argmax is the region under the token centre."""
    grid = OUT // PATCH
    centre = np.arange(grid) * PATCH + PATCH // 2
    square = coverage_region(coverage, width, height)
    hits = total = 0
    for draw in range(draws):
        np.random.seed(draw)
        item = dataset[draw % len(dataset)]
        token_targets, _ = expand_targets(item, COLS * ROWS)
        predicted = token_targets.argmax(-1).reshape(grid, grid)
        if transpose:
            predicted = predicted.T
        image = item["image"] / 255.0                           # uint8 [3, H, W] -> [0, 1] (no Normalize)
        # colour at the token centre: mean of the 2 x 2 pixels around it
        colour = sum(image[:, centre[:, None] + dy, centre[None, :] + dx] for dy in (-1, 0) for dx in (-1, 0)) / 4
        x = colour[0] * width
        y = colour[1] * height
        checked = colour[2] < 0.5                                # not RandAugment fill
        checked &= (x >= square[0]) & (x < square[2]) & (y >= square[1]) & (y < square[3])   # map knows it
        truth = region_of(x, y, width, height)
        hits += int((predicted == truth)[checked].sum())
        total += int(checked.sum())
    assert total > draws * grid * grid * 0.2, "too few tokens could be checked"
    return hits / total


@pytest.mark.parametrize("coverage", ["center_square", "full"])
@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_flip_and_crop_align(tmp_path, coverage, kind):
    width, height = make_data(str(tmp_path), coverage, kind)
    dataset = build(str(tmp_path), coverage)
    assert agreement(dataset, coverage, width, height) >= 0.95


@pytest.mark.parametrize("op", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
@pytest.mark.parametrize("coverage", ["center_square", "full"])
def test_geometric_randaugment_ops_align(tmp_path, op, coverage):
    width, height = make_data(str(tmp_path), coverage, "png", count=3)
    dataset = build(str(tmp_path), coverage, geometric_op=op)
    assert agreement(dataset, coverage, width, height, draws=60) >= 0.95


class _FlipMapAlways(RandomHorizontalFlip):
    """The bug of an earlier port: the map flips on every sample, the image half the time."""

    def apply(self, sample, rng):
        flipped = rng.random() < self.prob
        if flipped:
            sample.image = sample.image.transpose(Image.FLIP_LEFT_RIGHT)
        sample.label_map = np.ascontiguousarray(sample.label_map[:, :, :, ::-1])
        return sample


def test_the_check_catches_misalignment(tmp_path):
    """Negative controls: the measure drops far below 95% for swapped axes (the reference's RoIAlign
    box), a wrong coverage, or a map that flips when the image does not."""
    width, height = make_data(str(tmp_path), "center_square", "png")
    dataset = build(str(tmp_path), "center_square")
    assert agreement(dataset, "center_square", width, height, transpose=True) < 0.8
    wrong = build(str(tmp_path), "center_square", store_coverage="full")
    assert agreement(wrong, "center_square", width, height) < 0.8
    dataset.transforms[0] = _FlipMapAlways(prob=0.5)
    assert agreement(dataset, "center_square", width, height) < 0.85
