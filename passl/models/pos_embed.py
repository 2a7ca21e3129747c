"""Resize a learned position embedding to another token grid (e.g. fine-tuning 224 -> 384)."""
import math

import numpy as np
import paddle
import paddle.nn.functional as F

from passl.errors import CheckpointError

__all__ = ["resize_pos_embed", "grid_of", "pos_embed_grid"]


def _pair(grid):
    return (int(grid), int(grid)) if np.isscalar(grid) else (int(grid[0]), int(grid[1]))


def grid_of(num_patch_tokens, key="pos_embed"):
    """The square grid (h, w) holding ``num_patch_tokens`` tokens; CheckpointError if none does."""
    side = int(round(math.sqrt(num_patch_tokens)))
    if side * side != num_patch_tokens:
        raise CheckpointError(f"{key}: {num_patch_tokens} patch tokens do not form a square grid; "
                              "pass old_grid=(h, w) explicitly")
    return side, side


def pos_embed_grid(shape, num_prefix_tokens=1):
    """The token grid (h, w) of a position embedding of ``shape``: [1, h, w, D] (a grid, as VOLO keeps
    it) or [1, num_prefix_tokens + h*w, D] (a sequence; square grid inferred)."""
    if len(shape) == 4:
        return int(shape[1]), int(shape[2])
    return grid_of(shape[1] - num_prefix_tokens)


def resize_pos_embed(pos_embed, new_grid, old_grid=None, num_prefix_tokens=1):
    """Bicubic resize of the patch part of a position embedding; the cls position is kept as is.

    pos_embed: [1, num_prefix_tokens + h*w, D], or a grid [1, h, w, D] with no prefix (VOLO's layout);
    numpy array or paddle Tensor. new_grid: int or (h', w'); old_grid: (h, w), inferred as square
    when omitted. Returns [1, num_prefix_tokens + h'*w', D] (or [1, h', w', D]) of the same kind and
    dtype as the input.
    """
    is_numpy = isinstance(pos_embed, np.ndarray)
    values = paddle.to_tensor(pos_embed) if is_numpy else pos_embed
    if values.ndim == 4 and values.shape[0] == 1:   # grid layout: resize it as a sequence without prefix
        new_h, new_w = _pair(new_grid)
        if (new_h, new_w) == tuple(values.shape[1:3]):
            return pos_embed
        flat = values.reshape([1, values.shape[1] * values.shape[2], values.shape[3]])
        out = resize_pos_embed(flat, (new_h, new_w), tuple(values.shape[1:3]), num_prefix_tokens=0)
        out = out.reshape([1, new_h, new_w, values.shape[3]])
        return out.numpy() if is_numpy else out
    dtype = values.dtype
    if values.ndim != 3 or values.shape[0] != 1:
        raise CheckpointError(f"pos_embed must be [1, tokens, dim] or [1, rows, cols, dim], "
                              f"got shape {list(values.shape)}")
    new_h, new_w = _pair(new_grid)
    num_patches, dim = values.shape[1] - num_prefix_tokens, values.shape[2]
    old_h, old_w = _pair(old_grid) if old_grid is not None else grid_of(num_patches)
    if old_h * old_w != num_patches:
        raise CheckpointError(f"pos_embed has {num_patches} patch tokens, not a {old_h}x{old_w} grid")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    prefix, patches = values[:, :num_prefix_tokens], values[:, num_prefix_tokens:]
    grid = patches.astype("float32").reshape([1, old_h, old_w, dim]).transpose([0, 3, 1, 2])
    grid = F.interpolate(grid, size=[new_h, new_w], mode="bicubic", align_corners=False)
    patches = grid.transpose([0, 2, 3, 1]).reshape([1, new_h * new_w, dim]).astype(dtype)
    out = paddle.concat([prefix, patches], axis=1)
    return out.numpy() if is_numpy else out
