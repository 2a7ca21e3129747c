"""Building blocks of LV-ViT (and of the models that share them): the reference initialisations,
the conv stems, stochastic depth, attention, MLP, the pre-norm block with ``skip_lam``, and MixToken's
pure functions (draw a box, its mask, swap tokens inside it).
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.nn.initializer import Constant, TruncatedNormal, Uniform

from passl.errors import ConfigError
from passl.models.outputs import TokenLabelOutput

__all__ = ["ConvStem", "PatchConv", "DropPath", "attention", "Attention", "Mlp", "Block", "draw_mix_box",
           "box_mask", "mix_tokens", "TokenLabelModel"]

# trunc normal std .02, truncated at +-2 absolute as the reference does (i.e. practically untruncated)
_trunc_normal = TruncatedNormal(mean=0.0, std=0.02, a=-2.0, b=2.0)


def _torch_default_conv_attr(fan_in):
    """PyTorch's default conv init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return paddle.ParamAttr(initializer=Uniform(-bound, bound))


def _conv(in_chans, out_chans, kernel, stride, padding=0, bias=False):
    fan_in = in_chans * kernel * kernel
    return nn.Conv2D(in_chans, out_chans, kernel, stride=stride, padding=padding,
                     weight_attr=_torch_default_conv_attr(fan_in),
                     bias_attr=_torch_default_conv_attr(fan_in) if bias else False)


def _linear(in_features, out_features, bias=True):
    return nn.Linear(in_features, out_features, weight_attr=paddle.ParamAttr(initializer=_trunc_normal),
                     bias_attr=paddle.ParamAttr(initializer=Constant(0.0)) if bias else False)


# ---------------------------------------------------------------------------------------------
# stems: images [B, 3, H, W] -> token maps [B, D, H/16, W/16]

class ConvStem(nn.Layer):
    """Reference ``pe4_2`` stem: conv7x7 s2 + BN + ReLU, two conv3x3 + BN + ReLU at width C,
    then a conv of kernel = stride = patch/2 projecting to D. Overall stride = patch_size."""

    def __init__(self, in_chans=3, embed_dim=384, patch_size=16, width=64):
        super().__init__()
        if patch_size % 2:
            raise ConfigError(f"stem pe4_2 needs an even patch_size, got {patch_size}")
        self.conv1 = _conv(in_chans, width, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2D(width, epsilon=1e-5)
        self.conv2 = _conv(width, width, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2D(width, epsilon=1e-5)
        self.conv3 = _conv(width, width, 3, stride=1, padding=1)
        self.bn3 = nn.BatchNorm2D(width, epsilon=1e-5)
        self.proj = _conv(width, embed_dim, patch_size // 2, stride=patch_size // 2, bias=True)

    def forward(self, images):
        """images: [B, 3, H, W] -> [B, D, H/patch, W/patch]"""
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.proj(x)


class PatchConv(nn.Layer):
    """Plain ViT stem: one conv of kernel = stride = patch_size (for experiments and tests)."""

    def __init__(self, in_chans=3, embed_dim=384, patch_size=16):
        super().__init__()
        self.proj = _conv(in_chans, embed_dim, patch_size, stride=patch_size, bias=True)

    def forward(self, images):
        """images: [B, 3, H, W] -> [B, D, H/patch, W/patch]"""
        return self.proj(images)


# ---------------------------------------------------------------------------------------------
# transformer parts

class DropPath(nn.Layer):
    """Stochastic depth: zero a residual branch for a whole sample with probability ``p``
    (Paddle's RNG), scaling the survivors by 1/(1-p). Identity in eval mode."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = paddle.floor(keep + paddle.rand([x.shape[0]] + [1] * (x.ndim - 1), dtype="float32"))
        return x * (mask / keep).astype(x.dtype)   # scale the [B, 1, ...] mask, not x: one pass over x

    def extra_repr(self):
        return f"p={self.p}"


def attention(q, k, v, dropout_p=0.0, training=False):
    """softmax(q k^T / sqrt(head_dim)) v for q [B, Tq, heads, hd], k and v [B, Tk, heads, hd] -> [B, Tq, heads, hd].

    Paddle's ``scaled_dot_product_attention`` picks the kernel (paddle/nn/functional/sdpa.py,
    ``select_sdp_for_sdpa``): flash attention for float16/bfloat16 on a GPU of SM 8.0-12.1 when head_dim
    is a multiple of 8 and ``scale`` is None (``check_scale_is_None`` refuses any explicit scale), else the
    memory-efficient kernel when head_dim is aligned (8 for 16-bit dtypes), else matmul-softmax-matmul
    (``_math_attention``: it scales q by head_dim ** -0.5, not the T x T scores). The scale here is always
    the default, so it is never passed: S/M/L (head_dim 64) get flash attention under AMP.

    LV-ViT-T (head_dim 60) takes the math path under float16/bfloat16 and the memory-efficient kernel in
    float32 (alignment 4 on tensor-core GPUs). Padding q, k, v to 64 would reach flash attention, but at
    224 px (T = 197, 4 heads) the padded copies of q, k, v and their gradients move bytes of the same order
    as the [B, 4, 197, 197] scores flash attention saves, and the attention matmuls are ~14% of a block's
    multiply-adds (2 T^2 D against 10 T D^2), so the gain is small at best and unmeasured here: T is
    left on Paddle's own choice.
    """
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, training=training)


class Attention(nn.Layer):
    """Multi-head self-attention; ``qkv`` is one Linear(D, 3D) as in the reference checkpoints."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = _linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = _linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        """x: [B, T, D] -> [B, T, D]"""
        dim = x.shape[-1]
        # reshape with 0 keeps B and T symbolic, so the layer traces with a dynamic batch; unbind
        # (not qkv[0], qkv[1], qkv[2]) because each slice's backward writes a full-size zero gradient
        q, k, v = self.qkv(x).reshape([0, 0, 3, self.num_heads, self.head_dim]).unbind(2)  # [B, T, heads, hd]
        x = attention(q, k, v, self.attn_drop.p if self.training else 0.0, self.training)
        return self.proj_drop(self.proj(x.reshape([0, 0, dim])))


class Mlp(nn.Layer):
    """Linear(D, rD) - exact GELU - dropout - Linear(rD, D) - dropout."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = _linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = _linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        """x: [B, T, D] -> [B, T, D]"""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Layer):
    """Pre-norm transformer block whose residual branches are divided by ``skip_lam``."""

    def __init__(self, dim, num_heads, mlp_ratio=3.0, qkv_bias=False, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, skip_lam=1.0):
        super().__init__()
        self.skip_lam = float(skip_lam)
        self.norm1 = nn.LayerNorm(dim, epsilon=1e-5)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, epsilon=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        """x: [B, T, D] -> [B, T, D]"""
        x = x + self._scaled(self.drop_path(self.attn(self.norm1(x))))
        return x + self._scaled(self.drop_path(self.mlp(self.norm2(x))))

    def _scaled(self, branch):
        # skip_lam 1 (LV-ViT-T) would cost a full elementwise pass forward and backward for nothing
        return branch if self.skip_lam == 1.0 else branch / self.skip_lam


# ---------------------------------------------------------------------------------------------
# MixToken

def draw_mix_box(grid_h, grid_w):
    """One MixToken box per batch, from Paddle's RNG, without leaving the device.

    lam ~ Beta(1, 1) = U(0, 1); cut = floor(side * sqrt(1 - lam)) per axis; the centre is uniform
    over the grid cells; the box is centre +- cut // 2 clipped to the grid. Returns int64 [4] =
    (row1, col1, row2, col2), end-exclusive; it may be empty (no mix).
    """
    lam = paddle.rand([1], dtype="float32")
    ratio = paddle.sqrt(1.0 - lam)
    sides = paddle.concat([paddle.full([1], grid_h, dtype="int64"), paddle.full([1], grid_w, dtype="int64")])
    cut = paddle.floor(sides.astype("float32") * ratio).astype("int64")
    centre = paddle.concat([paddle.randint(0, grid_h, [1], dtype="int64"),
                            paddle.randint(0, grid_w, [1], dtype="int64")])
    start = paddle.maximum(centre - cut // 2, paddle.zeros_like(centre))
    end = paddle.minimum(centre + cut // 2, sides)
    return paddle.concat([start, end])


def box_mask(box, grid_h, grid_w):
    """box: int64 [4] (row1, col1, row2, col2) -> bool [grid_h, grid_w], True inside the box."""
    rows = paddle.arange(grid_h, dtype="int64")
    cols = paddle.arange(grid_w, dtype="int64")
    in_rows = paddle.logical_and(rows >= box[0], rows < box[2])
    in_cols = paddle.logical_and(cols >= box[1], cols < box[3])
    return paddle.logical_and(in_rows.unsqueeze(1), in_cols.unsqueeze(0))


def mix_tokens(x, mask):
    """Where ``mask`` (broadcast against x [B, ...]) is True, sample i takes sample B-1-i's values.
    Applying it twice with the same mask gives x back: it mixes the stem's tokens and un-mixes aux."""
    return paddle.where(mask, x[::-1], x)


# ---------------------------------------------------------------------------------------------
# what every token-labeling model shares around its heads

class TokenLabelModel(nn.Layer):
    """Base of the token-labeling models (LV-ViT, VOLO, ViT): ``head`` on the class token, ``aux_head``
    on every patch token, a ``cls_token`` and a learned ``pos_embed``. A subclass sets ``img_size``,
    ``grid_size`` (the token grid), ``patch_embed``, ``aux_weight`` and the heads."""

    def set_geometry(self, img_size, patch_size, num_classes, embed_dim, mix_token, return_dense, aux_weight,
                     patch_note=None):
        """Check and keep what every part of the model reads: ``img_size`` (int or (h, w)) divisible by
        ``patch_size`` (the pixels per token side; ``patch_note`` says where that size comes from when it
        is not the ``patch_size`` key), the token grid and count, the class count, the width and the head
        flags."""
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_h % patch_size or img_w % patch_size:
            raise ConfigError(f"model.img_size {img_size} must be divisible by "
                              f"{patch_note or f'patch_size {patch_size}'} "
                              f"(e.g. {max(patch_size, img_h // patch_size * patch_size)})")
        if num_classes < 1:
            raise ConfigError(f"model.num_classes must be >= 1, got {num_classes}")
        self.img_size = (img_h, img_w)
        self.patch_size = patch_size
        self.grid_size = (img_h // patch_size, img_w // patch_size)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.mix_token = bool(mix_token)
        self.return_dense = bool(return_dense)
        self.aux_weight = float(aux_weight)

    def no_weight_decay(self):
        """Names of parameters that take no weight decay (1-D params are excluded by the optimizer)."""
        return {"pos_embed", "cls_token"}

    def reset_heads(self):
        """Re-initialise ``head`` and ``aux_head`` (trunc normal .02 weights, zero biases)."""
        for layer in (self.head, self.aux_head):
            _trunc_normal(layer.weight)
            Constant(0.0)(layer.bias)

    def embed(self, images):
        """images [B, C_in, H, W] -> patch embedding [B, D, h, w], checked against the model's grid."""
        x = self.patch_embed(images)
        if tuple(x.shape[2:]) != self.grid_size:
            raise ConfigError(
                f"input of {images.shape[2]}x{images.shape[3]} px gives a {x.shape[2]}x{x.shape[3]} token grid, "
                f"but the model was built for img_size {self.img_size} ({self.grid_size[0]}x{self.grid_size[1]}); "
                "build it with the matching img_size (loading weights resizes pos_embed)")
        return x

    def head_outputs(self, cls_logits, aux_logits, mix_box):
        """What forward returns from the heads (aux_logits [B, N, C] or None, mix_box int64 [4] or None).
        Eval: ``cls + aux_weight * max over tokens of aux`` [B, C] per sample (cls alone without aux).
        Training: TokenLabelOutput, with aux un-mixed inside mix_box so that row i describes image i."""
        if not self.training:
            return cls_logits if aux_logits is None else cls_logits + self.aux_weight * aux_logits.max(axis=1)
        if mix_box is not None:
            aux_logits = mix_tokens(aux_logits, box_mask(mix_box, *self.grid_size).reshape([-1, 1]))
        return TokenLabelOutput(cls_logits, aux_logits, mix_box)
