"""LV-ViT (Jiang et al., "All Tokens Matter", NeurIPS 2021): stems, blocks, the model, variants.

Layer and parameter names follow the reference PyTorch release, so a converted checkpoint maps
key for key (see passl/models/convert.py). Read top to bottom: stems, attention / MLP / block,
MixToken, the LVViT layer, then one small factory per published variant.
"""
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.nn.initializer import Constant, TruncatedNormal, Uniform

from passl.errors import ConfigError
from passl.models.cpu_ops import Linear
from passl.ranges import DropRate, NonNegativeFloat, PositiveFloat, PositiveInt
from passl.registry import MODELS

__all__ = ["LVViT", "ConvStem", "PatchConv", "Attention", "Mlp", "Block", "DropPath", "VARIANTS",
           "STEMS", "lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l"]

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
    return Linear(in_features, out_features, weight_attr=paddle.ParamAttr(initializer=_trunc_normal),
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
        self.stride = patch_size
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
        self.stride = patch_size
        self.proj = _conv(in_chans, embed_dim, patch_size, stride=patch_size, bias=True)

    def forward(self, images):
        """images: [B, 3, H, W] -> [B, D, H/patch, W/patch]"""
        return self.proj(images)


STEMS = {
    "pe4_2": lambda in_chans, embed_dim, patch_size: ConvStem(in_chans, embed_dim, patch_size, width=64),
    "pe4_2_128": lambda in_chans, embed_dim, patch_size: ConvStem(in_chans, embed_dim, patch_size, width=128),
    "patch16": lambda in_chans, embed_dim, patch_size: PatchConv(in_chans, embed_dim, patch_size),
}


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


class Attention(nn.Layer):
    """Multi-head self-attention; ``qkv`` is one Linear(D, 3D) as in the reference checkpoints."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
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
        # Paddle picks flash / memory-efficient kernels on GPU where dtype and shape allow, and plain
        # matmul-softmax-matmul elsewhere (scaling q, not the T x T scores: ~1.4x faster on the CPU)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                           training=self.training, scale=self.scale)
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

def reverse_batch(x):
    """x[::-1] along axis 0, as a gather: Paddle's CPU flip kernel is ~6x slower."""
    return paddle.index_select(x, paddle.arange(x.shape[0] - 1, -1, -1, dtype="int64"), axis=0)


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


# ---------------------------------------------------------------------------------------------
# the model

class LVViT(nn.Layer):
    """LV-ViT: conv stem, cls token + learned position embedding, ``depth`` blocks, final LayerNorm,
    ``head`` on the cls token and ``aux_head`` on every patch token.

    Forward (images [B, in_chans, H, W], H and W = the ``img_size`` the model was built for):
      - train, return_dense: ``(cls [B, C], aux [B, N, C], box)``; with mix_token, tokens inside
        ``box`` (int64 [4], row1, col1, row2, col2 on the token grid) come from batch row B-1-i,
        and ``aux`` is un-mixed so row i always describes image i; ``box`` is None without mix_token.
      - train, not return_dense: ``cls [B, C]`` (no MixToken: the loss could not mix the targets).
      - eval: ``cls + aux_weight * max over tokens of aux`` [B, C] (return_dense), else ``cls``.
    """

    def __init__(self, img_size: PositiveInt = 224, patch_size: PositiveInt = 16, in_chans: PositiveInt = 3,
                 num_classes: PositiveInt = 1000, embed_dim: PositiveInt = 384, depth: PositiveInt = 16,
                 num_heads: PositiveInt = 6, mlp_ratio: PositiveFloat = 3.0, qkv_bias: bool = False,
                 drop_rate: DropRate = 0.0, attn_drop_rate: DropRate = 0.0, drop_path_rate: DropRate = 0.0,
                 stem: str = "pe4_2", skip_lam: PositiveFloat = 1.0, mix_token: bool = True, return_dense: bool = True,
                 aux_weight: NonNegativeFloat = 0.5):
        super().__init__()
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if stem not in STEMS:
            raise ConfigError(f"model.stem '{stem}' is unknown; use one of {', '.join(STEMS)}")
        if img_h % patch_size or img_w % patch_size:
            raise ConfigError(f"model.img_size {img_size} must be divisible by patch_size {patch_size} "
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

        self.patch_embed = STEMS[stem](in_chans, embed_dim, patch_size)
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=_trunc_normal)
        self.pos_embed = self.create_parameter([1, self.num_tokens + 1, embed_dim],
                                               default_initializer=_trunc_normal)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = np.linspace(0.0, drop_path_rate, depth) if depth else []  # stochastic depth rises from 0
        self.blocks = nn.LayerList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, float(r), skip_lam)
            for r in rates])
        self.norm = nn.LayerNorm(embed_dim, epsilon=1e-5)
        self.head = _linear(embed_dim, num_classes)
        self.aux_head = _linear(embed_dim, num_classes)

    def no_weight_decay(self):
        """Names of parameters that take no weight decay (1-D params are excluded by the optimizer)."""
        return {"pos_embed", "cls_token"}

    def reset_heads(self):
        """Re-initialise ``head`` and ``aux_head`` (trunc normal .02 weights, zero biases)."""
        for layer in (self.head, self.aux_head):
            _trunc_normal(layer.weight)
            Constant(0.0)(layer.bias)

    # -- pieces ----------------------------------------------------------------------------------
    def embed(self, images):
        """images [B, C_in, H, W] -> stem output [B, D, h, w], checked against the model's grid."""
        x = self.patch_embed(images)
        if tuple(x.shape[2:]) != self.grid_size:
            raise ConfigError(
                f"input of {images.shape[2]}x{images.shape[3]} px gives a {x.shape[2]}x{x.shape[3]} token grid, "
                f"but the model was built for img_size {self.img_size} ({self.grid_size[0]}x{self.grid_size[1]}); "
                "build it with the matching img_size (loading weights resizes pos_embed)")
        return x

    def tokens(self, grid_maps):
        """[B, D, h, w] -> [B, 1 + h*w, D]: flatten, prepend the cls token, add pos_embed."""
        x = grid_maps.flatten(2).transpose([0, 2, 1])
        cls = self.cls_token.expand([x.shape[0], 1, self.embed_dim])
        return self.pos_drop(paddle.concat([cls.astype(x.dtype), x], axis=1) + self.pos_embed)

    def forward_features(self, images):
        """images [B, C_in, H, W] -> [B, 1 + N, D] tokens after the final LayerNorm (never mixed)."""
        x = self.tokens(self.embed(images))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_dense_maps(self, images, block_indices=(-1,), apply_norm=False):
        """Patch tokens after the chosen blocks as maps for dense tasks.

        images [B, C_in, H, W]; block_indices: 0-based, negative counts from the end.
        Returns a list (in the order asked) of [B, D, H/16, W/16]; ``apply_norm`` passes each
        through the final LayerNorm first.
        """
        depth = len(self.blocks)
        bad = [i for i in block_indices if not -depth <= i < depth]
        if bad:
            raise ConfigError(f"block_indices {bad} out of range for a model with {depth} blocks")
        wanted = [i % depth for i in block_indices]
        x = self.tokens(self.embed(images))
        found = {}
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in wanted:
                out = self.norm(x) if apply_norm else x
                found[index] = out[:, 1:].transpose([0, 2, 1]).reshape(
                    [0, self.embed_dim, self.grid_size[0], self.grid_size[1]])
        return [found[i] for i in wanted]

    def forward(self, images):
        """See the class docstring for the outputs of each mode."""
        x = self.embed(images)                                  # [B, D, h, w]
        mixing = self.training and self.mix_token and self.return_dense
        box = mask = None
        if mixing:
            box = draw_mix_box(*self.grid_size)
            mask = box_mask(box, *self.grid_size)               # [h, w]
            x = paddle.where(mask.unsqueeze(0).unsqueeze(0), reverse_batch(x), x)
        x = self.tokens(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        cls_logits = self.head(x[:, 0])                         # [B, C]
        if not self.return_dense:
            return cls_logits
        aux_logits = self.aux_head(x[:, 1:])                    # [B, N, C]
        if not self.training:
            return cls_logits + self.aux_weight * aux_logits.max(axis=1)
        if mixing:  # undo the mix so aux row i lines up with image i everywhere
            grid = aux_logits.reshape([0, self.grid_size[0], self.grid_size[1], self.num_classes])
            grid = paddle.where(mask.unsqueeze(0).unsqueeze(-1), reverse_batch(grid), grid)
            aux_logits = grid.reshape([0, self.num_tokens, self.num_classes])
        return cls_logits, aux_logits, box


# ---------------------------------------------------------------------------------------------
# published variants (architecture only; training hyper-parameters live in configs/)

VARIANTS = {
    "lvvit_t": dict(embed_dim=240, depth=12, num_heads=4, stem="pe4_2", skip_lam=1.0),
    "lvvit_s": dict(embed_dim=384, depth=16, num_heads=6, stem="pe4_2", skip_lam=2.0),
    "lvvit_m": dict(embed_dim=512, depth=20, num_heads=8, stem="pe4_2", skip_lam=2.0),
    "lvvit_l": dict(embed_dim=768, depth=24, num_heads=12, stem="pe4_2_128", skip_lam=3.0),
}


def _build(variant, **overrides):
    return LVViT(patch_size=16, mlp_ratio=3.0, qkv_bias=False, **VARIANTS[variant], **overrides)


MODELS.register("LVViT")(LVViT)


@MODELS.register()
def lvvit_t(img_size: PositiveInt = 224, num_classes: PositiveInt = 1000, in_chans: PositiveInt = 3,
            drop_rate: DropRate = 0.0, attn_drop_rate: DropRate = 0.0, drop_path_rate: DropRate = 0.1,
            mix_token: bool = True, return_dense: bool = True, aux_weight: NonNegativeFloat = 0.5):
    """LV-ViT-T: dim 240, depth 12, 4 heads, 8.53M params at 224."""
    return _build("lvvit_t", **locals())  # the arguments, as overrides


@MODELS.register()
def lvvit_s(img_size: PositiveInt = 224, num_classes: PositiveInt = 1000, in_chans: PositiveInt = 3,
            drop_rate: DropRate = 0.0, attn_drop_rate: DropRate = 0.0, drop_path_rate: DropRate = 0.1,
            mix_token: bool = True, return_dense: bool = True, aux_weight: NonNegativeFloat = 0.5):
    """LV-ViT-S: dim 384, depth 16, 6 heads, skip_lam 2, 26.2M params at 224."""
    return _build("lvvit_s", **locals())  # the arguments, as overrides


@MODELS.register()
def lvvit_m(img_size: PositiveInt = 224, num_classes: PositiveInt = 1000, in_chans: PositiveInt = 3,
            drop_rate: DropRate = 0.0, attn_drop_rate: DropRate = 0.0, drop_path_rate: DropRate = 0.2,
            mix_token: bool = True, return_dense: bool = True, aux_weight: NonNegativeFloat = 0.5):
    """LV-ViT-M: dim 512, depth 20, 8 heads, skip_lam 2, 55.8M params at 224."""
    return _build("lvvit_m", **locals())  # the arguments, as overrides


@MODELS.register()
def lvvit_l(img_size: PositiveInt = 448, num_classes: PositiveInt = 1000, in_chans: PositiveInt = 3,
            drop_rate: DropRate = 0.0, attn_drop_rate: DropRate = 0.0, drop_path_rate: DropRate = 0.3,
            mix_token: bool = True, return_dense: bool = True, aux_weight: NonNegativeFloat = 0.5):
    """LV-ViT-L: dim 768, depth 24, 12 heads, 128-wide stem, skip_lam 3, 150.5M params at 448
    (its published weights are 448 and 512, hence the default img_size)."""
    return _build("lvvit_l", **locals())  # the arguments, as overrides

