"""Target pooling against a literal RoIAlign written here with loops, and the compact softmax."""
import math

import numpy as np
import pytest

from passl.data.collate import collate_fn
from passl.data.targets import (build_token_targets, compact_softmax, expand_targets, fallback_targets,
                                pool_label_map)

C = 20


def scatter(label_map):
    """[2, K, h, w] top-K map -> dense [C, h, w] logits (0 outside the top-K)."""
    _, k, h, w = label_map.shape
    out = np.zeros((C, h, w))
    for i in range(h):
        for j in range(w):
            for kk in range(k):
                cls = int(label_map[1, kk, i, j])
                if cls >= 0:
                    out[cls, i, j] = label_map[0, kk, i, j]
    return out


def bilinear(dense, u, v):
    """Value at continuous map point (x=u, y=v), cell j spanning [j, j+1); 0 outside the map."""
    _, h, w = dense.shape
    if u < 0 or u > w or v < 0 or v > h:
        return np.zeros(dense.shape[0])
    x = min(max(u - 0.5, 0.0), w - 1.0)
    y = min(max(v - 0.5, 0.0), h - 1.0)
    x0, y0 = int(math.floor(x)), int(math.floor(y))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    return ((1 - fy) * ((1 - fx) * dense[:, y0, x0] + fx * dense[:, y0, x1])
            + fy * ((1 - fx) * dense[:, y1, x0] + fx * dense[:, y1, x1]))


def roi_align(dense, box, rows, cols):
    """[rows * cols, C]: each bin averages ceil(bin size) x ceil(bin size) evenly spread samples."""
    x0, y0, x1, y1 = box
    bin_w, bin_h = (x1 - x0) / cols, (y1 - y0) / rows
    nx, ny = max(1, math.ceil(bin_w - 1e-9)), max(1, math.ceil(bin_h - 1e-9))
    out = np.zeros((rows, cols, dense.shape[0]))
    for r in range(rows):
        for c in range(cols):
            acc = 0
            for sy in range(ny):
                for sx in range(nx):
                    acc = acc + bilinear(dense, x0 + (c + (sx + 0.5) / nx) * bin_w, y0 + (r + (sy + 0.5) / ny) * bin_h)
            out[r, c] = acc / (nx * ny)
    return out.reshape(rows * cols, -1)


def random_map(rng, k=3, h=9, w=7, empty=0.2):
    label_map = np.zeros((2, k, h, w), np.float32)
    for i in range(h):
        for j in range(w):
            label_map[1, :, i, j] = rng.choice(C, k, replace=False)
    label_map[0] = rng.normal(1, 3, (k, h, w))
    hole = rng.random((h, w)) < empty                 # cells emptied by a geometric op
    label_map[0][:, hole], label_map[1][:, hole] = 0, -1
    return label_map


@pytest.mark.parametrize("box", [(0, 0, 7, 9), (1.3, 2.2, 5.9, 8.1), (-2.5, 3.0, 4.0, 12.5), (2.1, 0.4, 2.9, 1.1)])
def test_pooling_matches_literal_roi_align(box):
    rng = np.random.default_rng(0)
    label_map = random_map(rng)
    dense = scatter(label_map)
    classes, token_logits, cls_logits = pool_label_map(label_map, box, (3, 4))
    want_tokens, want_cls = roi_align(dense, box, 3, 4), roi_align(dense, box, 1, 1)[0]
    # classes not listed must have pooled logit 0 exactly
    unlisted = np.setdiff1d(np.arange(C), classes)
    np.testing.assert_allclose(want_tokens[:, unlisted], 0, atol=1e-12)
    np.testing.assert_allclose(token_logits, want_tokens[:, classes], atol=1e-9)
    np.testing.assert_allclose(cls_logits, want_cls[classes], atol=1e-9)


def test_compact_softmax_equals_full_softmax_with_zero_logits_elsewhere():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 20, (5, 4))            # large values: the shift must keep it stable
    probs, bg = compact_softmax(logits, C)
    full = np.concatenate([logits, np.zeros((5, C - 4))], 1)
    want = np.exp(full - full.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, want[:, :4], rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(bg, want[:, 5], rtol=1e-10, atol=1e-300)


def test_targets_of_a_sample_sum_to_one_and_expand():
    rng = np.random.default_rng(2)
    label_map = random_map(rng)
    # view = right half of a 140 x 180 image whose full-coverage map is 7 x 9 cells
    fields = build_token_targets(label_map, (70, 0, 140, 180), (0, 0, 140, 180), (3, 3), C)
    token, cls = expand_targets(fields, C, smoothing=0.1)
    np.testing.assert_allclose(token.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(cls.sum(), 1, atol=1e-5)
    assert token.min() >= 0.1 / C - 1e-7
    dense = scatter(label_map)
    pooled = roi_align(dense, (3.5, 0, 7, 9), 3, 3)
    want = np.exp(pooled) / np.exp(pooled).sum(1, keepdims=True)
    np.testing.assert_allclose(token, 0.9 * want + 0.1 / C, atol=1e-6)


def test_collate_pads_classes_and_keeps_numpy():
    rng = np.random.default_rng(3)
    items = []
    for i in range(3):
        fields = (build_token_targets(random_map(rng), (0, 0, 7, 9), (0, 0, 7, 9), (2, 2), C) if i < 2
                  else fallback_targets(5, 4))
        items.append({"image": np.zeros((3, 32, 32), np.float32), "label": np.asarray(i, np.int64),
                      "bad_image_index": np.asarray(-1, np.int64), **fields})
    batch = collate_fn(items)
    assert all(isinstance(v, np.ndarray) for v in batch.values())
    width = batch["target_classes"].shape[1]
    assert width % 8 == 0 and width >= max(len(i["target_classes"]) for i in items)
    assert batch["token_probs"].shape == (3, 4, width) and batch["token_bg"].shape == (3, 4)
    assert batch["cls_probs"].shape == (3, width) and batch["cls_bg"].shape == (3,)
    assert batch["label"].dtype == np.int64 and batch["image"].shape == (3, 3, 32, 32)
    for row, item in enumerate(items):
        packed = {k: batch[k][row] for k in ("target_classes", "token_probs", "token_bg", "cls_probs", "cls_bg")}
        np.testing.assert_allclose(expand_targets(packed, C)[0], expand_targets(item, C)[0], atol=1e-7)
    assert batch["target_classes"][2].tolist()[:2] == [5, -1]


# A centre-square map of a 140 x 100 image: 10 x 10 cells of 10 px over x in [20, 120]; the columns
# x < 20 and x > 120 are not labelled (the published maps' coverage).
WIDE, HIGH, SQUARE = 140, 100, (20.0, 0.0, 120.0, 100.0)


def full_map(rng, h=10, w=10, k=3):
    label_map = random_map(rng, k=k, h=h, w=w, empty=0.0)
    label_map[0] = np.abs(label_map[0]) + 1.0           # confident cells: pooled targets are far from uniform
    return label_map


def test_centre_square_map_leaves_uncovered_tokens_out_and_pools_the_class_over_the_covered_part():
    label_map = full_map(np.random.default_rng(4))
    # 7 token columns of 20 px: the first and the last lie wholly outside the square
    fields = build_token_targets(label_map, (0, 0, WIDE, HIGH), SQUARE, (2, 7), C, label=3)
    np.testing.assert_array_equal(fields["token_weight"].reshape(2, 7), [[0, 1, 1, 1, 1, 1, 0]] * 2)
    # the covered tokens and the class target are those of the covered part of the view, the square
    # itself (here the sample points coincide, so the pooling is the same)
    covered = build_token_targets(label_map, SQUARE, SQUARE, (2, 5), C, label=3)
    token, cls = expand_targets(fields, C)
    want_token, want_cls = expand_targets(covered, C)
    np.testing.assert_allclose(token.reshape(2, 7, C)[:, 1:6], want_token.reshape(2, 5, C), atol=1e-6)
    np.testing.assert_allclose(cls, want_cls, atol=1e-6)
    # and against the literal RoIAlign over the square, softmaxed over all C classes
    pooled = roi_align(scatter(label_map), (0, 0, 10, 10), 1, 1)[0]
    np.testing.assert_allclose(cls, np.exp(pooled) / np.exp(pooled).sum(), atol=1e-6)


def test_partly_covered_token_is_pooled_over_its_covered_samples():
    """Coverage is the share of a bin's RoIAlign samples that fall on the map (bilinear weights, so
    exactly the share of samples for an unpadded map); below MIN_TOKEN_COVERAGE the token is left out."""
    label_map = full_map(np.random.default_rng(5))
    # x 0..30 px = map cells -2..1: samples at -1.5, -0.5, 0.5 -> 1/3 covered: left out
    assert build_token_targets(label_map, (0, 0, 30, HIGH), SQUARE, (1, 1), C, label=3)["token_weight"].tolist() == [0]
    # x 4..54 px = cells -1.6..3.4: samples at -1.1, -0.1, 0.9, 1.9, 2.9 -> 3/5 covered: kept, and averaged
    # over those 3 x 10 samples only
    view = (4, 0, 54, HIGH)
    fields = build_token_targets(label_map, view, SQUARE, (1, 1), C, label=3)
    assert fields["token_weight"].tolist() == [1.0]
    x0 = (view[0] - SQUARE[0]) / 10
    dense = scatter(label_map)
    values = [bilinear(dense, x0 + sx + 0.5, sy + 0.5) for sy in range(10) for sx in range(5) if x0 + sx + 0.5 >= 0]
    assert len(values) == 30
    pooled = np.mean(values, axis=0)
    token, cls = expand_targets(fields, C)
    np.testing.assert_allclose(token[0], np.exp(pooled) / np.exp(pooled).sum(), atol=1e-6)
    np.testing.assert_allclose(cls, token[0], atol=1e-6)     # one bin: the class target is the same pooling


def test_crop_that_misses_the_map_gets_the_image_label():
    label_map = full_map(np.random.default_rng(6))
    fields = build_token_targets(label_map, (0, 10, 18, 40), SQUARE, (2, 2), C, label=7)
    assert not fields["token_weight"].any()
    token, cls = expand_targets(fields, C)
    np.testing.assert_array_equal(cls, np.eye(C, dtype=np.float32)[7])
    np.testing.assert_allclose(token.sum(-1), 1, atol=1e-6)   # well-formed rows, though never trained on
    # without a label, the class target is what the pooling gives: uniform
    _, cls = expand_targets(build_token_targets(label_map, (0, 10, 18, 40), SQUARE, (2, 2), C), C)
    np.testing.assert_allclose(cls, 1.0 / C, atol=1e-7)


def test_full_coverage_keeps_every_token():
    label_map = full_map(np.random.default_rng(7))
    fields = build_token_targets(label_map, (13, 7, 91, 88), (0, 0, 100, 100), (3, 3), C, label=1)
    assert fields["token_weight"].tolist() == [1.0] * 9
    _, token_logits, cls_logits = pool_label_map(label_map, (1.3, 0.7, 9.1, 8.8), (3, 3))
    probs, _ = compact_softmax(token_logits, C)
    np.testing.assert_allclose(fields["token_probs"], probs, atol=1e-7)   # the plain pooling, unchanged


def test_padding_by_a_geometric_op_marks_unknown_cells():
    """RandAugment's ops pad a centre-square map to the view with UNKNOWN cells (content the map does
    not label); the targets leave those out as they do the uncovered part of an unpadded map."""
    from passl.data.targets import UNKNOWN
    from passl.data.transforms import Sample, warp_label_map
    label_map = full_map(np.random.default_rng(8))
    sample = Sample(image=np.zeros((HIGH, WIDE, 3), np.uint8), label_map=label_map.copy(), map_region=SQUARE)
    warp_label_map(sample, (1, 0, 0, 0, 1, 0))             # the identity: only the padding shows
    assert sample.label_map.shape[2:] == (10, 14) and sample.map_region == (0.0, 0.0, 140.0, 100.0)
    assert (sample.label_map[1][:, :, :2] == UNKNOWN).all() and (sample.label_map[1][:, :, 12:] == UNKNOWN).all()
    padded = build_token_targets(sample.label_map, sample.view, sample.map_region, (2, 7), C, label=3)
    plain = build_token_targets(label_map, sample.view, SQUARE, (2, 7), C, label=3)
    np.testing.assert_array_equal(padded["token_weight"], plain["token_weight"])
    kept = plain["token_weight"] > 0
    np.testing.assert_allclose(expand_targets(padded, C)[0][kept], expand_targets(plain, C)[0][kept], atol=1e-6)
    np.testing.assert_allclose(expand_targets(padded, C)[1], expand_targets(plain, C)[1], atol=1e-6)
