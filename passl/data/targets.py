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

Coverage (SPEC 4). A map may not label every part of the view: the published maps cover the image's
centre square only, so a crop of a wide image reaches past the map; the transforms pad such a map
with *unknown* cells (class ``UNKNOWN``, score 0). Pooled as they are, those parts would count as
logit 0 for every class, i.e. a uniform target, which the reference never trains towards. Instead,
each bin is pooled over its known part only (the RoIAlign average divided by the known share of the
bin), and
- a token whose bin is less than ``MIN_TOKEN_COVERAGE`` known is left out of the dense term
  (``token_weight`` 0; the loss averages over the tokens that have targets);
- the class-token target is pooled over the known part of the crop, and is the image label when
  the crop shows no known cell at all.
Empty cells (class -1, e.g. where a rotation brings in fill pixels) are known to show nothing and
keep logit 0, as in the reference. With a map that covers the view (``full`` coverage, no padding)
nothing changes: every bin is wholly known and every token weight is 1.
"""
import math

import numpy as np

__all__ = ["axis_weights", "map_box", "pool_label_map", "compact_softmax", "build_token_targets",
           "fallback_targets", "expand_targets", "TARGET_KEYS", "UNKNOWN", "MIN_TOKEN_COVERAGE"]

TARGET_KEYS = ("target_classes", "token_probs", "token_bg", "token_weight", "cls_probs", "cls_bg")
UNKNOWN = -2.0                 # class of a cell the map does not label (outside its coverage)
MIN_TOKEN_COVERAGE = 0.5       # a token whose bin is less known than this gets no dense target


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


def pool_label_map(label_map, box, grid, coverage=False):
    """Pool a top-K map over ``box`` into per-token and class-token logits over the present classes.

    label_map: [2, K, h, w] (scores, class indices; class < 0 marks an empty entry, ``UNKNOWN`` a cell
    outside the map's coverage). box: (x0, y0, x1, y1) in map cells. grid: (rows, cols) of tokens.
    Returns classes [U] int64 (sorted), token_logits [rows * cols, U], cls_logits [U] (float64): the
    plain RoIAlign average, where samples outside the map and unknown cells count as logit 0.
    With ``coverage``, also token_known [rows * cols] and cls_known [] in [0, 1]: the share of each
    bin that falls on known cells (pooled with the same weights; exactly 1 for a wholly known bin).
    """
    _, _, mh, mw = label_map.shape
    rows, cols = grid
    wy, wx = axis_weights(box[1], box[3], rows, mh), axis_weights(box[0], box[2], cols, mw)
    wy1, wx1 = axis_weights(box[1], box[3], 1, mh), axis_weights(box[0], box[2], 1, mw)
    # only cells with weight matter; their span is contiguous because the box is
    used_y = np.flatnonzero((wy.sum(0) + wy1.sum(0)) > 0)
    used_x = np.flatnonzero((wx.sum(0) + wx1.sum(0)) > 0)
    if used_y.size == 0 or used_x.size == 0:
        empty = (np.zeros(0, np.int64), np.zeros((rows * cols, 0)), np.zeros(0))
        return empty + (np.zeros(rows * cols), np.float64(0.0)) if coverage else empty
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
    if not coverage:
        return union, token_logits, cls_logits
    inside = box[0] >= 0 and box[1] >= 0 and box[2] <= mw and box[3] <= mh
    unknown = (classes == int(UNKNOWN)).all(0)                                  # [h', w']
    if inside and not unknown.any():            # the common case: a wholly known view
        return union, token_logits, cls_logits, np.ones(rows * cols), np.float64(1.0)
    known = (~unknown).astype(np.float64)[:, :, None]
    token_known = _separable_pool(known, wy, wx).reshape(rows * cols)
    cls_known = _separable_pool(known, wy1, wx1).reshape(())
    return union, token_logits, cls_logits, token_known, cls_known


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


def build_token_targets(label_map, view, map_region, grid, num_classes, label=None):
    """Compact targets (TARGET_KEYS) of one sample whose image shows ``view`` of a map over ``map_region``.

    label_map: [2, K, h, w]; view, map_region: (x0, y0, x1, y1) reference-frame boxes; grid (rows, cols).
    label: the image label, the class target when the view shows no known cell (None: uniform then).
    Parts of the view outside ``map_region`` or on ``UNKNOWN`` cells are not labelled: each bin is
    pooled over its known part, and tokens less than MIN_TOKEN_COVERAGE known get token_weight 0.
    """
    box = map_box(view, map_region, label_map.shape[2:])
    classes, token_logits, cls_logits, token_known, cls_known = pool_label_map(label_map, box, grid, coverage=True)
    token_weight = (token_known >= MIN_TOKEN_COVERAGE - 1e-9).astype(np.float32)
    # the mean over the known part of a bin: unknown cells added logit 0 and no weight
    partial = np.flatnonzero(token_known < 1.0)
    if partial.size:
        token_logits[partial] /= np.maximum(token_known[partial], 1e-12)[:, None]
    if cls_known > 1e-9:
        if cls_known < 1.0:
            cls_logits = cls_logits / cls_known
    elif label is not None:                     # the crop misses the map: the image label
        return _with_class_label(classes, token_logits, token_weight, int(label), num_classes)
    token_probs, token_bg = compact_softmax(token_logits, num_classes)
    return _fields(classes, token_probs, token_bg, token_weight, *compact_softmax(cls_logits, num_classes))


def _with_class_label(classes, token_logits, token_weight, label, num_classes):
    """Targets whose class target is one-hot ``label`` (added to the listed classes with token logit 0)."""
    if label not in classes:
        at = int(np.searchsorted(classes, label))
        classes = np.insert(classes, at, label)
        token_logits = np.insert(token_logits, at, 0.0, axis=1)
    token_probs, token_bg = compact_softmax(token_logits, num_classes)
    return _fields(classes, token_probs, token_bg, token_weight, classes == label, 0.0)


def fallback_targets(label, num_tokens):
    """Targets of an image without a label map: its one-hot label for the class token and every token."""
    return _fields(np.array([label]), np.ones((num_tokens, 1)), np.zeros(num_tokens), np.ones(num_tokens),
                   np.ones(1), 0.0)


def _fields(classes, token_probs, token_bg, token_weight, cls_probs, cls_bg):
    """The compact target fields (TARGET_KEYS) in the dtypes the collate and the loss expect."""
    return {"target_classes": np.asarray(classes, np.int64), "token_probs": np.asarray(token_probs, np.float32),
            "token_bg": np.asarray(token_bg, np.float32), "token_weight": np.asarray(token_weight, np.float32),
            "cls_probs": np.asarray(cls_probs, np.float32), "cls_bg": np.asarray(cls_bg, np.float32)}


def expand_targets(fields, num_classes, smoothing=0.0):
    """Dense targets of ONE sample from its compact fields (for inspection and tests; the loss never
    builds them). Returns token_targets [N, C] and cls_target [C], float32, rows summing to 1:
    (1 - smoothing) * p + smoothing / C. Rows of tokens with ``token_weight`` 0 are not trained on."""
    classes = np.asarray(fields["target_classes"])
    keep = classes >= 0
    classes = classes[keep]
    token = np.repeat(np.asarray(fields["token_bg"], np.float64)[:, None], num_classes, axis=1)
    token[:, classes] = np.asarray(fields["token_probs"])[:, keep]
    cls = np.full(num_classes, float(fields["cls_bg"]))
    cls[classes] = np.asarray(fields["cls_probs"])[keep]
    off = smoothing / num_classes
    return ((1 - smoothing) * token + off).astype(np.float32), ((1 - smoothing) * cls + off).astype(np.float32)
