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
