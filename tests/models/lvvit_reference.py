"""An independent description of the reference LV-ViT, written from SPEC 1-2 only (no passl code):
the PyTorch checkpoint key names and shapes, and a numpy forward pass in eval mode."""
import collections
import math

import numpy as np

PUBLISHED = {  # SPEC 1 table: dim, depth, heads, stem width, skip_lam, params, GMACs, img_size
    "lvvit_t": (240, 12, 4, 64, 1.0, 8_534_720, 2.87, 224),
    "lvvit_s": (384, 16, 6, 64, 2.0, 26_151_824, 6.57, 224),
    "lvvit_m": (512, 20, 8, 64, 2.0, 55_830_544, 12.74, 224),
    "lvvit_l": (768, 24, 12, 128, 3.0, 150_473_552, 157.0, 448),
}


def reference_shapes(dim, depth, num_classes, width, grid, mlp_ratio=3.0, patch=16):
    """OrderedDict key -> shape of a reference (PyTorch) LV-ViT checkpoint; width None = patch16 stem."""
    hidden = int(dim * mlp_ratio)
    shapes = collections.OrderedDict()
    shapes["cls_token"] = (1, 1, dim)
    shapes["pos_embed"] = (1, grid * grid + 1, dim)
    if width:
        shapes["patch_embed.conv1.weight"] = (width, 3, 7, 7)
        shapes["patch_embed.conv2.weight"] = (width, width, 3, 3)
        shapes["patch_embed.conv3.weight"] = (width, width, 3, 3)
        for i in (1, 2, 3):
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"patch_embed.bn{i}.{name}"] = (width,)
            shapes[f"patch_embed.bn{i}.num_batches_tracked"] = ()
        shapes["patch_embed.proj.weight"] = (dim, width, patch // 2, patch // 2)
    else:
        shapes["patch_embed.proj.weight"] = (dim, 3, patch, patch)
    shapes["patch_embed.proj.bias"] = (dim,)
    for i in range(depth):
        p = f"blocks.{i}."
        shapes[p + "norm1.weight"] = shapes[p + "norm1.bias"] = (dim,)
        shapes[p + "attn.qkv.weight"] = (3 * dim, dim)
        shapes[p + "attn.proj.weight"] = (dim, dim)
        shapes[p + "attn.proj.bias"] = (dim,)
        shapes[p + "norm2.weight"] = shapes[p + "norm2.bias"] = (dim,)
        shapes[p + "mlp.fc1.weight"] = (hidden, dim)
        shapes[p + "mlp.fc1.bias"] = (hidden,)
        shapes[p + "mlp.fc2.weight"] = (dim, hidden)
        shapes[p + "mlp.fc2.bias"] = (dim,)
    shapes["norm.weight"] = shapes["norm.bias"] = (dim,)
    shapes["head.weight"] = (num_classes, dim)
    shapes["head.bias"] = (num_classes,)
    shapes["aux_head.weight"] = (num_classes, dim)
    shapes["aux_head.bias"] = (num_classes,)
    return shapes


def reference_state_dict(rng, **kwargs):
    """Random reference-layout weights (float32; BN variances positive, num_batches_tracked int64)."""
    out = collections.OrderedDict()
    for key, shape in reference_shapes(**kwargs).items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(1234, dtype=np.int64)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight")) or ".bn" in key and key.endswith("weight"):
            out[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            scale = 1.0 / math.sqrt(np.prod(shape[1:])) if len(shape) > 1 and key != "pos_embed" else 0.1
            out[key] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# numpy forward (eval mode) of the reference architecture

def _conv(x, weight, bias, stride, pad):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = weight.shape[-1]
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    out = np.einsum("bchwij,ocij->bohw", windows, weight, optimize=True)
    return out if bias is None else out + bias[None, :, None, None]


def _bn(x, sd, prefix, eps=1e-5):
    scale = sd[prefix + "weight"] / np.sqrt(sd[prefix + "running_var"] + eps)
    shift = sd[prefix + "bias"] - sd[prefix + "running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _ln(x, sd, prefix, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * sd[prefix + "weight"] + sd[prefix + "bias"]


def _linear(x, sd, prefix):
    out = x @ sd[prefix + "weight"].T
    return out + sd[prefix + "bias"] if prefix + "bias" in sd else out


_erf = np.vectorize(math.erf)


def reference_forward(sd, images, num_heads, skip_lam, aux_weight=0.5, patch=16):
    """Eval output [B, C] = cls + aux_weight * max over tokens of aux, in float64 numpy."""
    sd = {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}
    x = np.asarray(images, dtype=np.float64)
    if "patch_embed.conv1.weight" in sd:
        x = np.maximum(_bn(_conv(x, sd["patch_embed.conv1.weight"], None, 2, 3), sd, "patch_embed.bn1."), 0)
        x = np.maximum(_bn(_conv(x, sd["patch_embed.conv2.weight"], None, 1, 1), sd, "patch_embed.bn2."), 0)
        x = np.maximum(_bn(_conv(x, sd["patch_embed.conv3.weight"], None, 1, 1), sd, "patch_embed.bn3."), 0)
        x = _conv(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], patch // 2, 0)
    else:
        x = _conv(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], patch, 0)
    batch, dim = x.shape[:2]
    x = x.reshape(batch, dim, -1).transpose(0, 2, 1)
    x = np.concatenate([np.repeat(sd["cls_token"], batch, 0), x], 1) + sd["pos_embed"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    head_dim = dim // num_heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = _ln(x, sd, p + "norm1.")
        qkv = _linear(h, sd, p + "attn.qkv.").reshape(batch, -1, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        attn = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * head_dim ** -0.5
        attn = np.exp(attn - attn.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        h = (attn @ qkv[2]).transpose(0, 2, 1, 3).reshape(batch, -1, dim)
        x = x + _linear(h, sd, p + "attn.proj.") / skip_lam
        h = _linear(_ln(x, sd, p + "norm2."), sd, p + "mlp.fc1.")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = x + _linear(h, sd, p + "mlp.fc2.") / skip_lam
    x = _ln(x, sd, "norm.")
    cls = _linear(x[:, 0], sd, "head.")
    aux = _linear(x[:, 1:], sd, "aux_head.")
    return cls + aux_weight * aux.max(1)


def reference_box_area_mean(grid_h, grid_w, draws, seed=0):
    """Mean box area / N of the reference rand_bbox (lam ~ Beta(1,1), integer centre), simulated."""
    rng = np.random.default_rng(seed)
    lam = rng.beta(1.0, 1.0, draws)
    cut_h = (grid_h * np.sqrt(1 - lam)).astype(int)
    cut_w = (grid_w * np.sqrt(1 - lam)).astype(int)
    cy, cx = rng.integers(0, grid_h, draws), rng.integers(0, grid_w, draws)
    rows = np.clip(cy + cut_h // 2, 0, grid_h) - np.clip(cy - cut_h // 2, 0, grid_h)
    cols = np.clip(cx + cut_w // 2, 0, grid_w) - np.clip(cx - cut_w // 2, 0, grid_w)
    return float((rows * cols).mean() / (grid_h * grid_w))
