"""Per-token and class-token targets from a dense label map (SPEC 3), in a compact form.

For the crop the image shows (``Sample.view``, placed on the map through ``Sample.map_region``),
the map's top-K scores are scattered into C class logits per cell (0 for classes outside the top-K),
pooled RoIAlign-style (bilinear sampling, adaptive samples per bin, aligned) over an L_h x L_w grid
of bins for the tokens and one bin for the class token, and softmaxed over all C classes.

Only the union U of classes present in the cells the crop touches can have a logit other than 0,
so a token's distribution is exactly: ``probs[u]`` for the U classes and one shared ``bg`` value
for each of the C - U others (their logit is 0: they keep probability mass). A sample ships
``target_classes`` [U] int64, ``token_probs`` [N, U], ``token_bg`` [N], ``cls_probs`` [U],
``cls_bg`` [] (float32) instead of [N, C]: ~N * U * 4 bytes (U is ~10-40 for K = 5).
Label smoothing, the MixToken mix and the ground-truth blend happen in the loss, on device.
"""
import math

import numpy as np

__all__ = ["axis_weights", "map_box", "pool_label_map", "compact_softmax", "build_token_targets",
           "fallback_targets", "expand_targets", "TARGET_KEYS"]

TARGET_KEYS = ("target_classes", "token_probs", "token_bg", "cls_probs", "cls_bg")


def axis_weights(start, end, bins, size):
    """RoIAlign weights along one axis: [bins, size] float64.

    start, end: the box on this axis in map-cell coordinates (cell j spans [j, j + 1)). Each bin
    averages ceil((end - start) / bins) sample points (at least 1) spread evenly inside it; a
    sample inside the map interpolates linearly between the two nearest cell centres (clamped at
    the edges), a sample outside the map (before 0 or after ``size``) contributes logit 0.
    """
    length = end - start
    per_bin = max(1, int(math.ceil(length / bins - 1e-9)))
    count = bins * per_bin                                          # sample k sits at (k + 0.5) / count
    points = start + (np.arange(count) + 0.5) * (length / count)
    pos = np.clip(points - 0.5, 0, size - 1)                        # in cell-centre index units
    # linear interpolation between the two nearest cell centres, as a [count, size] tent
    weights = np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(size)))
    weights *= (((points >= 0) & (points <= size)) / per_bin)[:, None]
    return weights.reshape(bins, per_bin, size).sum(1)


def map_box(view, map_region, map_size):
    """The view box (reference frame) in map-cell coordinates: (x0, y0, x1, y1).
    map_size: (h, w) cells of the map covering ``map_region``."""
    rx0, ry0, rx1, ry1 = map_region
    mh, mw = map_size
    sx, sy = mw / (rx1 - rx0), mh / (ry1 - ry0)
    return ((view[0] - rx0) * sx, (view[1] - ry0) * sy, (view[2] - rx0) * sx, (view[3] - ry0) * sy)


def pool_label_map(label_map, box, grid):
    """Pool a top-K map over ``box`` into per-token and class-token logits over the present classes.

    label_map: [2, K, h, w] (scores, class indices; class < 0 marks an empty entry).
    box: (x0, y0, x1, y1) in map cells. grid: (rows, cols) of tokens.
    Returns classes [U] int64 (sorted), token_logits [rows * cols, U], cls_logits [U] (float64).
    """
    _, _, mh, mw = label_map.shape
    rows, cols = grid
    wy, wx = axis_weights(box[1], box[3], rows, mh), axis_weights(box[0], box[2], cols, mw)
    wy1, wx1 = axis_weights(box[1], box[3], 1, mh), axis_weights(box[0], box[2], 1, mw)
    # only cells with weight matter; their span is contiguous because the box is
    used_y = np.flatnonzero((wy.sum(0) + wy1.sum(0)) > 0)
    used_x = np.flatnonzero((wx.sum(0) + wx1.sum(0)) > 0)
    if used_y.size == 0 or used_x.size == 0:
        return np.zeros(0, np.int64), np.zeros((rows * cols, 0)), np.zeros(0)
    y0, y1, x0, x1 = used_y[0], used_y[-1] + 1, used_x[0], used_x[-1] + 1
    scores = label_map[0, :, y0:y1, x0:x1]
    classes = np.rint(label_map[1, :, y0:y1, x0:x1]).astype(np.int64)
    valid = (classes >= 0) & (scores != 0)     # a 0 score equals "not in the top-K"
    k, i, j = np.nonzero(valid)
    present = classes[k, i, j]
    union, where = np.unique(present, return_inverse=True)
    dense = np.zeros((y1 - y0, x1 - x0, union.size))
    dense[i, j, where] = scores[k, i, j]
    wy, wx, wy1, wx1 = wy[:, y0:y1], wx[:, x0:x1], wy1[:, y0:y1], wx1[:, x0:x1]
    token_logits = _separable_pool(dense, wy, wx).reshape(rows * cols, union.size)
    cls_logits = _separable_pool(dense, wy1, wx1).reshape(union.size)
    return union, token_logits, cls_logits


def _separable_pool(dense, wy, wx):
    """[h, w, U] cells -> [rows, cols, U] bins: sum_ij wy[a, i] wx[b, j] dense[i, j, :]."""
    h, w, count = dense.shape
    if count == 0:
        return np.zeros((wy.shape[0], wx.shape[0], 0))
    by_row = (wy @ dense.reshape(h, w * count)).reshape(-1, w, count)      # [rows, w, U]
    return np.matmul(wx[None], by_row)                                    # [rows, cols, U]


def compact_softmax(logits, num_classes):
    """Softmax over C classes of logits that are 0 outside the U listed ones.

    logits: [..., U]. Returns probs [..., U] and bg [...] (the probability of each of the C - U
    other classes), so that probs.sum(-1) + (C - U) * bg == 1.
    """
    count = logits.shape[-1]
    shift = np.maximum(logits.max(-1), 0.0) if count else np.zeros(logits.shape[:-1])
    exp = np.exp(logits - shift[..., None])
    bg_exp = np.exp(-shift)
    total = exp.sum(-1) + (num_classes - count) * bg_exp
    return exp / total[..., None], bg_exp / total


def build_token_targets(label_map, view, map_region, grid, num_classes):
    """Compact targets (TARGET_KEYS) of one sample whose image shows ``view`` of a map over ``map_region``.

    label_map: [2, K, h, w]; view, map_region: (x0, y0, x1, y1) reference-frame boxes; grid (rows, cols).
    """
    box = map_box(view, map_region, label_map.shape[2:])
    classes, token_logits, cls_logits = pool_label_map(label_map, box, grid)
    token_probs, token_bg = compact_softmax(token_logits, num_classes)
    cls_probs, cls_bg = compact_softmax(cls_logits, num_classes)
    return {"target_classes": classes.astype(np.int64), "token_probs": token_probs.astype(np.float32),
            "token_bg": token_bg.astype(np.float32), "cls_probs": cls_probs.astype(np.float32),
            "cls_bg": np.asarray(cls_bg, np.float32)}


def fallback_targets(label, num_tokens):
    """Targets of an image without a label map: its one-hot label for the class token and every token."""
    return {"target_classes": np.array([label], np.int64), "token_probs": np.ones((num_tokens, 1), np.float32),
            "token_bg": np.zeros(num_tokens, np.float32), "cls_probs": np.ones(1, np.float32),
            "cls_bg": np.asarray(0.0, np.float32)}


def expand_targets(fields, num_classes, smoothing=0.0):
    """Dense targets of ONE sample from its compact fields (for inspection and tests; the loss never
    builds them). Returns token_targets [N, C] and cls_target [C], float32, rows summing to 1:
    (1 - smoothing) * p + smoothing / C."""
    classes = np.asarray(fields["target_classes"])
    keep = classes >= 0
    classes = classes[keep]
    token = np.repeat(np.asarray(fields["token_bg"], np.float64)[:, None], num_classes, axis=1)
    token[:, classes] = np.asarray(fields["token_probs"])[:, keep]
    cls = np.full(num_classes, float(fields["cls_bg"]))
    cls[classes] = np.asarray(fields["cls_probs"])[keep]
    off = smoothing / num_classes
    return ((1 - smoothing) * token + off).astype(np.float32), ((1 - smoothing) * cls + off).astype(np.float32)
