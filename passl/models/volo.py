"""VOLO (Yuan et al., "VOLO: Vision Outlooker for Visual Recognition", TPAMI 2022): outlook attention,
the two-stage model trained with token labeling, and its published variants D1-D5.

Layer and parameter names follow the public release (sail-sg/volo), so its checkpoints convert key for
key (passl/models/convert.py). Inside the model, token maps are channels-last ``[B, h, w, C]`` as in the
release. Read top to bottom: the stem, outlook attention and its block, class attention and its block,
the VOLO layer, then the variant table and one registered factory per variant.
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.nn.initializer import Uniform

from passl.errors import ConfigError
from passl.models.layers import (Block, ConvStem, DropPath, Mlp, TokenLabelModel, _linear, _trunc_normal,
                                 attention, box_mask, draw_mix_box)
from passl.ranges import DropRate, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ranged
from passl.registry import MODELS

__all__ = ["VOLO", "OutlookAttention", "Outlooker", "ClassAttention", "ClassBlock", "Downsample", "VOLOStem",
           "VARIANTS", "match_state_dict", "volo_d1", "volo_d2", "volo_d3", "volo_d4", "volo_d5"]

PATCH_SIZE = 8       # stem stride: 224 px -> a 28 x 28 map for the outlookers
POOLING_SCALE = 2    # Downsample stride: 28 x 28 -> the 14 x 14 token grid of stage 2 and of the token labels

# Linear layers and tokens take the release's init (timm's trunc normal .02, zero bias): layers._linear


# ---------------------------------------------------------------------------------------------
# stem: images [B, 3, H, W] -> [B, H/8, W/8, C]

class VOLOStem(nn.Layer):
    """The LV-ViT conv stem (passl.models.lvvit.ConvStem: conv7x7 s2 + BN + ReLU, two conv3x3 + BN + ReLU
    at width ``hidden_dim``, a projection conv of kernel = stride = patch/2) with patch 8, its layers
    arranged under the release's names: ``conv`` = [conv, BN, ReLU] x 3, then ``proj``."""

    def __init__(self, in_chans=3, embed_dim=192, hidden_dim=64):
        super().__init__()
        stem = ConvStem(in_chans, embed_dim, PATCH_SIZE, width=hidden_dim)
        self.conv = nn.Sequential(stem.conv1, stem.bn1, nn.ReLU(), stem.conv2, stem.bn2, nn.ReLU(),
                                  stem.conv3, stem.bn3, nn.ReLU())
        self.proj = stem.proj

    def forward(self, images):
        """images: [B, 3, H, W] -> [B, H/8, W/8, embed_dim] (channels-last)"""
        return self.proj(self.conv(images)).transpose([0, 2, 3, 1])


# ---------------------------------------------------------------------------------------------
# stage 1: outlook attention

class OutlookAttention(nn.Layer):
    """Outlook attention, as the VOLO paper defines it. For each k x k window, centred every ``stride``
    pixels, the attention weights come straight from the centre: A = softmax(scale * Linear(avgpool_stride(x)))
    reshaped to [heads, k*k, k*k]; the window's values V (a Linear of x, gathered with ``unfold``) become
    A @ V, and the k*k outputs of every window are summed back onto the map (``fold``). Then ``proj``.
    No queries or keys: ``v`` and ``attn`` are the only inputs of the mixing.
    """

    def __init__(self, dim, num_heads, kernel_size=3, padding=1, stride=1, qkv_bias=False, attn_drop=0.0,
                 proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"VOLO outlooker dim {dim} must be divisible by its num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size, self.padding, self.stride = kernel_size, padding, stride
        self.scale = self.head_dim ** -0.5
        self.v = _linear(dim, dim, bias=qkv_bias)
        self.attn = _linear(dim, kernel_size ** 4 * num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = _linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # fold as a transposed conv whose kernel puts input channel c*k*k + q at window position q of output
        # channel c: Paddle's F.fold rejects the unknown batch size of an exported model (it asserts
        # prod(shape) >= 0 on the symbolic shape); the same sum, at 61 vs 48 ms of CPU time for F.fold
        # (forward + backward, batch 16 of D1's 28 x 28 x 192 map, 2 cores)
        one_hot = paddle.eye(kernel_size ** 2).reshape([kernel_size ** 2, 1, kernel_size, kernel_size])
        self.register_buffer("fold_kernel", one_hot.tile([dim, 1, 1, 1]), persistable=False)

    def fold(self, windows, height, width):
        """Sum the k x k outputs of every window back onto the map (``fold``).
        windows: [B, C*k*k, h*w] (channel-major, window position q = row*k + col) -> [B, C, H, W]."""
        rows, cols = math.ceil(height / self.stride), math.ceil(width / self.stride)
        return F.conv2d_transpose(windows.reshape([0, windows.shape[1], rows, cols]),
                                  self.fold_kernel.astype(windows.dtype), stride=self.stride, padding=self.padding,
                                  output_size=[height, width], groups=windows.shape[1] // self.kernel_size ** 2)

    def forward(self, x):
        """x: [B, H, W, C] -> [B, H, W, C]"""
        height, width, dim = x.shape[1], x.shape[2], x.shape[3]
        k2, heads, head_dim = self.kernel_size ** 2, self.num_heads, self.head_dim
        rows, cols = math.ceil(height / self.stride), math.ceil(width / self.stride)   # window centres
        values = F.unfold(self.v(x).transpose([0, 3, 1, 2]), self.kernel_size, self.stride, self.padding)
        values = values.reshape([0, heads, head_dim, k2, rows * cols]).transpose([0, 1, 4, 3, 2])
        # values: [B, heads, windows, k*k, head_dim]
        # pooled in NCHW: with data_format="NHWC" here, Paddle Inference's CPU predictor (export/predict)
        # fed the wrong axis to the attn Linear (8 of 16 channels in a tiny model); eager mode was right
        pooled = F.avg_pool2d(x.transpose([0, 3, 1, 2]), self.stride, self.stride, ceil_mode=True)
        pooled = pooled.transpose([0, 2, 3, 1])                                       # [B, h, w, C]
        weights = self.attn(pooled).reshape([0, rows * cols, heads, k2, k2]).transpose([0, 2, 1, 3, 4])
        weights = self.attn_drop(F.softmax(weights * self.scale, axis=-1))   # [B, heads, windows, k*k, k*k]
        out = paddle.matmul(weights, values).transpose([0, 1, 4, 3, 2]).reshape([0, dim * k2, rows * cols])
        out = self.fold(out, height, width)                                   # [B, C, H, W]
        return self.proj_drop(self.proj(out.transpose([0, 2, 3, 1])))


class Outlooker(nn.Layer):
    """Pre-norm block with outlook attention: x + OA(LN(x)), then x + MLP(LN(x)). x: [B, H, W, C]."""

    def __init__(self, dim, num_heads, kernel_size=3, padding=1, stride=2, mlp_ratio=3.0, qkv_bias=False,
                 attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, epsilon=1e-5)
        self.attn = OutlookAttention(dim, num_heads, kernel_size, padding, stride, qkv_bias, attn_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, epsilon=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        """x: [B, H, W, C] -> [B, H, W, C]"""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Downsample(nn.Layer):
    """Between the stages: conv of kernel = stride = ``patch_size`` (PyTorch's default conv init).
    [B, H, W, C] -> [B, H/p, W/p, C']."""

    def __init__(self, in_dim, out_dim, patch_size=POOLING_SCALE):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim * patch_size * patch_size)
        attr = lambda: paddle.ParamAttr(initializer=Uniform(-bound, bound))  # noqa: E731
        self.proj = nn.Conv2D(in_dim, out_dim, patch_size, stride=patch_size, weight_attr=attr(), bias_attr=attr())

    def forward(self, x):
        """x: [B, H, W, C] -> [B, H/p, W/p, C']"""
        return self.proj(x.transpose([0, 3, 1, 2])).transpose([0, 2, 3, 1])


# ---------------------------------------------------------------------------------------------
# post-stage: class attention (CaiT)

class ClassAttention(nn.Layer):
    """Only the class token queries: q = Linear(x_cls), (k, v) = Linear(x) over [cls, tokens];
    out = proj(softmax(scale * q k^T) v). x: [B, 1 + N, D] -> [B, 1, D]."""

    def __init__(self, dim, num_heads, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"VOLO class-attention dim {dim} must be divisible by its num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kv = _linear(dim, 2 * dim, bias=qkv_bias)
        self.q = _linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = _linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        """x: [B, 1 + N, D] -> [B, 1, D] (the class token's update)"""
        dim = x.shape[-1]
        keys, values = self.kv(x).reshape([0, 0, 2, self.num_heads, self.head_dim]).unbind(2)  # [B, T, h, hd]
        query = self.q(x[:, :1]).reshape([0, 1, self.num_heads, self.head_dim])
        out = attention(query, keys, values, self.attn_drop.p if self.training else 0.0, self.training)
        return self.proj_drop(self.proj(out.reshape([0, 1, dim])))


class ClassBlock(nn.Layer):
    """Class-attention block: cls += CA(LN(x)); cls += MLP(LN(cls)); the patch tokens pass unchanged.
    x: [B, 1 + N, D] -> [B, 1 + N, D]."""

    def __init__(self, dim, num_heads, mlp_ratio=3.0, qkv_bias=False, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, epsilon=1e-5)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, attn_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, epsilon=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        """x: [B, 1 + N, D] -> [B, 1 + N, D]"""
        cls = x[:, :1] + self.drop_path(self.attn(self.norm1(x)))
        cls = cls + self.drop_path(self.mlp(self.norm2(cls)))
        return paddle.concat([cls, x[:, 1:]], axis=1)


# ---------------------------------------------------------------------------------------------
# the model

class VOLO(TokenLabelModel):
    """VOLO: conv stem to a H/8 map, ``layers[0]`` Outlookers, Downsample to the H/16 token grid and
    ``pos_embed``, ``layers[1:]`` transformer blocks, ``post_layers`` class-attention blocks on
    [cls, tokens], final LayerNorm, ``head`` on the cls token and ``aux_head`` on every patch token.

    Forward (images [B, in_chans, H, W], H and W = the ``img_size`` the model was built for):
      - train, return_dense: ``TokenLabelOutput(cls [B, C], aux [B, N, C], box)``. With mix_token the box
        (int64 [4], row1, col1, row2, col2) is drawn on the token grid and applied on the stem's map at twice
        the scale, so the outlookers see whole mixed 2 x 2 cells; ``aux`` is un-mixed on the token grid
        so that row i always describes image i. ``box`` is None without mix_token.
      - train, not return_dense: ``TokenLabelOutput(cls)`` (no MixToken: the loss could not mix the targets).
      - eval: ``cls + aux_weight * max over tokens of aux`` [B, C] (return_dense), else ``cls``.

    layers / embed_dims / num_heads: per stage, as the release lists them (stage 0 = outlookers at
    embed_dims[0], the other stages transformer blocks at one common width). Stochastic depth rises
    linearly over all ``sum(layers)`` blocks; as in the release the outlookers and the class-attention
    blocks take none (the rate of block j is drop_path_rate * j / (sum(layers) - 1)).
    """

    def __init__(self, layers: ranged(list, 0, kind=int) = (4, 4, 8, 2),
                 embed_dims: ranged(list, 1, kind=int) = (192, 384, 384, 384),
                 num_heads: ranged(list, 1, kind=int) = (6, 12, 12, 12), mlp_ratio: PositiveFloat = 3.0,
                 stem_hidden_dim: PositiveInt = 64, post_layers: PositiveInt = 2, img_size: PositiveInt = 224,
                 in_chans: PositiveInt = 3, num_classes: PositiveInt = 1000, qkv_bias: bool = False,
                 drop_rate: DropRate = 0.0, attn_drop_rate: DropRate = 0.0, drop_path_rate: DropRate = 0.0,
                 outlook_kernel: PositiveInt = 3, outlook_padding: NonNegativeInt = 1, outlook_stride: PositiveInt = 2,
                 mix_token: bool = True, return_dense: bool = True, aux_weight: NonNegativeFloat = 0.5):
        super().__init__()
        layers, embed_dims, num_heads = list(layers), list(embed_dims), list(num_heads)
        scale = PATCH_SIZE * POOLING_SCALE
        if not len(layers) == len(embed_dims) == len(num_heads) >= 2:
            raise ConfigError(f"model.layers {layers}, embed_dims {embed_dims} and num_heads {num_heads} need one "
                              "entry per stage (the outlooker stage, then at least one transformer stage)")
        if len(set(embed_dims[1:])) != 1:
            raise ConfigError(f"model.embed_dims {embed_dims}: the transformer stages (all after the first) "
                              "must share one width")
        if min(layers) < 0 or post_layers < 1:
            raise ConfigError(f"model.layers {layers} must be >= 0 and post_layers {post_layers} >= 1 "
                              "(the class token is made by the class-attention blocks)")
        self.set_geometry(img_size, scale, num_classes, embed_dims[-1], mix_token, return_dense, aux_weight,
                          patch_note=f"{scale} = patch {PATCH_SIZE} x downsampling {POOLING_SCALE}")

        self.patch_embed = VOLOStem(in_chans, embed_dims[0], stem_hidden_dim)
        self.pos_embed = self.create_parameter([1, *self.grid_size, self.embed_dim], default_initializer=_trunc_normal)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(layers)

        def rate(index):
            return drop_path_rate * index / (total - 1) if total > 1 else 0.0

        outlookers = nn.Sequential(*[
            Outlooker(embed_dims[0], num_heads[0], outlook_kernel, outlook_padding, outlook_stride, mlp_ratio,
                      qkv_bias, attn_drop_rate) for _ in range(layers[0])])
        stages = [outlookers, Downsample(embed_dims[0], embed_dims[1])]
        for stage in range(1, len(layers)):
            first = sum(layers[:stage])
            stages.append(nn.Sequential(*[
                Block(embed_dims[stage], num_heads[stage], mlp_ratio, qkv_bias, 0.0, attn_drop_rate, rate(first + i))
                for i in range(layers[stage])]))
        self.network = nn.LayerList(stages)   # release names: network.0 outlookers, .1 Downsample, .2+ blocks
        self.post_network = nn.LayerList([
            ClassBlock(self.embed_dim, num_heads[-1], mlp_ratio, qkv_bias, attn_drop_rate) for _ in range(post_layers)])
        self.cls_token = self.create_parameter([1, 1, self.embed_dim], default_initializer=_trunc_normal)
        self.norm = nn.LayerNorm(self.embed_dim, epsilon=1e-5)
        self.head = _linear(self.embed_dim, num_classes)
        self.aux_head = _linear(self.embed_dim, num_classes)

    @property
    def depth(self):
        """Blocks in all: outlookers, transformer blocks and class-attention blocks."""
        return sum(len(stage) for stage in (self.network[0], *self.network[2:])) + len(self.post_network)

    def count_macs(self, img_size=None):
        """Multiply-adds for one image, counted as passl.models.complexity counts LV-ViT's: convolutions,
        Linear layers and the attention products (outlook attention's A @ V included; its fold only adds).
        Returns {"total", "stem", "blocks", "attention", "heads", "grid", "tokens"}. At 224 px: 6.92 / 14.31 /
        20.73 / 44.26 / 72.30 G for D1-D5, within 2% of the paper's table for D1-D4 (6.8 / 14.1 / 20.6 / 43.8)
        and 5% over for D5 (69.0); the paper does not say how it counted."""
        img_h, img_w = self.img_size if img_size is None else (
            (img_size, img_size) if isinstance(img_size, int) else tuple(img_size))
        fine = (img_h // PATCH_SIZE) * (img_w // PATCH_SIZE)
        rows, cols = img_h // PATCH_SIZE // POOLING_SCALE, img_w // PATCH_SIZE // POOLING_SCALE
        tokens = rows * cols

        def conv(layer, outputs):
            out_ch, in_per_group, kh, kw = layer.weight.shape
            return outputs * out_ch * in_per_group * kh * kw

        def linears(layer, count):   # every Linear in ``layer`` (itself included) at ``count`` positions
            return sum(count * sub.weight.shape[0] * sub.weight.shape[1]
                       for sub in layer.sublayers(include_self=True) if isinstance(sub, nn.Linear))

        convs = [m for m in self.patch_embed.conv if isinstance(m, nn.Conv2D)]
        stem = conv(convs[0], img_h * img_w // 4) + sum(conv(c, img_h * img_w // 4) for c in convs[1:])
        stem += conv(self.patch_embed.proj, fine)
        blocks = attention = 0
        for block in self.network[0]:
            windows, dim = tokens, block.norm1.weight.shape[0]     # one window per 2 x 2 cell
            attn = block.attn
            blocks += linears(attn.v, fine) + linears(attn.proj, fine) + linears(block.mlp, fine)
            blocks += linears(attn.attn, windows)
            attention += windows * attn.kernel_size ** 4 * dim       # A [k*k, k*k] @ V [k*k, head_dim] per head
        blocks += conv(self.network[1].proj, tokens)
        for stage in self.network[2:]:
            for block in stage:
                blocks += linears(block, tokens)
                attention += 2 * tokens * tokens * block.norm1.weight.shape[0]
        for block in self.post_network:
            dim = block.norm1.weight.shape[0]
            blocks += linears(block.attn.kv, tokens + 1) + linears(block.attn.q, 1) + linears(block.attn.proj, 1)
            blocks += linears(block.mlp, 1)
            attention += 2 * (tokens + 1) * dim
        blocks += attention
        heads = self.embed_dim * self.num_classes * (1 + tokens)
        return {"total": stem + blocks + heads, "stem": stem, "blocks": blocks, "attention": attention,
                "heads": heads, "grid": (rows, cols), "tokens": tokens}

    # -- pieces ----------------------------------------------------------------------------------
    def embed(self, images):
        """images [B, C_in, H, W] -> stem output [B, H/8, W/8, D0], checked against the model's grid."""
        x = self.patch_embed(images)
        expected = (self.grid_size[0] * POOLING_SCALE, self.grid_size[1] * POOLING_SCALE)
        if tuple(x.shape[1:3]) != expected:
            raise ConfigError(
                f"input of {images.shape[2]}x{images.shape[3]} px does not fit a VOLO built for img_size "
                f"{self.img_size} ({self.grid_size[0]}x{self.grid_size[1]} tokens); build it with the matching "
                "img_size (loading weights resizes pos_embed)")
        return x

    def forward_tokens(self, x):
        """Stem output [B, H/8, W/8, D0] -> [B, 1 + N, D]: outlookers, downsampling, pos_embed, transformer
        blocks, cls token, class-attention blocks, final LayerNorm. Tokens in row-major grid order."""
        x = self.network[1](self.network[0](x))                        # [B, h, w, D]
        x = self.pos_drop(x + self.pos_embed).reshape([0, self.num_tokens, self.embed_dim])
        for stage in self.network[2:]:
            x = stage(x)
        cls = self.cls_token.expand([x.shape[0], 1, self.embed_dim]).astype(x.dtype)
        x = paddle.concat([cls, x], axis=1)
        for block in self.post_network:
            x = block(x)
        return self.norm(x)

    def forward_features(self, images):
        """images [B, C_in, H, W] -> [B, 1 + N, D] tokens after the final LayerNorm (never mixed)."""
        return self.forward_tokens(self.embed(images))

    def forward(self, images):
        """See the class docstring for the outputs of each mode."""
        x = self.embed(images)                                         # [B, 2h, 2w, D0]
        mixing = self.training and self.mix_token and self.return_dense
        box = None
        if mixing:
            box = draw_mix_box(*self.grid_size)                        # on the token grid
            fine = box_mask(box * POOLING_SCALE, x.shape[1], x.shape[2])
            x = paddle.where(fine.unsqueeze(0).unsqueeze(-1), x[::-1], x)
        x = self.forward_tokens(x)
        cls_logits = self.head(x[:, 0])                                        # [B, C]
        aux_logits = self.aux_head(x[:, 1:]) if self.return_dense else None   # [B, N, C]
        return self.head_outputs(cls_logits, aux_logits, box)   # eval fusion, or aux un-mixed on the token grid


# ---------------------------------------------------------------------------------------------
# published variants: architecture, and the release's per-variant drop path (training settings live in
# configs/volo/). Parameter counts as built by the release's models/volo.py (torch, 1000 classes).

VARIANTS = {
    "volo_d1": dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12),
                    mlp_ratio=3.0, stem_hidden_dim=64, drop_path_rate=0.1),
    "volo_d2": dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16),
                    mlp_ratio=3.0, stem_hidden_dim=64, drop_path_rate=0.2),
    "volo_d3": dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16),
                    mlp_ratio=3.0, stem_hidden_dim=64, drop_path_rate=0.5),
    "volo_d4": dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16),
                    mlp_ratio=3.0, stem_hidden_dim=64, drop_path_rate=0.5),
    "volo_d5": dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16),
                    mlp_ratio=4.0, stem_hidden_dim=128, drop_path_rate=0.75),
}

PARAMS = {"volo_d1": 26_632_040, "volo_d2": 58_678_336, "volo_d3": 86_325_072, "volo_d4": 192_961_520,
          "volo_d5": 295_455_584}


def _variant(name, summary):
    """The registered factory of a variant: VOLO with the variant's table entry as defaults."""
    return MODELS.register_variant(name, VOLO, VARIANTS[name],
                                   f"{summary}; {PARAMS[name]:,} parameters at 1000 classes.")


MODELS.register("VOLO")(VOLO)
volo_d1 = _variant("volo_d1", "VOLO-D1: outlookers 4 x 192, transformer 14 x 384, 84.2 top-1 at 224")
volo_d2 = _variant("volo_d2", "VOLO-D2: outlookers 6 x 256, transformer 18 x 512, 85.2 top-1 at 224")
volo_d3 = _variant("volo_d3", "VOLO-D3: outlookers 8 x 256, transformer 28 x 512, 85.4 top-1 at 224")
volo_d4 = _variant("volo_d4", "VOLO-D4: outlookers 8 x 384, transformer 28 x 768, 85.7 top-1 at 224")
volo_d5 = _variant("volo_d5", "VOLO-D5: outlookers 12 x 384, transformer 36 x 768, mlp 4, stem 128, "
                              "86.1 top-1 at 224")


# ---------------------------------------------------------------------------------------------
# checkpoint recognition (used by passl.models.convert.detect_variant)

def match_state_dict(state_dict):
    """(variant name or None, img_size) if ``state_dict`` (prefixes stripped, PyTorch or Paddle layout)
    is a VOLO's, else None. Recognised by the outlooker keys; the variant by its stage depths, widths,
    stem width and MLP ratio; img_size = 16 x the pos_embed grid."""
    if "network.0.0.attn.v.weight" not in state_dict or "pos_embed" not in state_dict:
        return None

    def shape(key):
        value = state_dict[key]
        return tuple(value.shape)

    stage_keys = [k for k in state_dict if k.startswith("network.") and k.endswith(".norm1.weight")]
    depth = {}
    for key in stage_keys:
        stage = int(key.split(".")[1])
        depth[stage] = depth.get(stage, 0) + 1
    layers = (depth.get(0, 0),) + tuple(depth.get(s, 0) for s in range(2, max(depth) + 1))
    dims = (shape("network.0.0.norm1.weight")[0], shape("norm.weight")[0])
    stem = shape("patch_embed.conv.0.weight")[0] if "patch_embed.conv.0.weight" in state_dict else None
    fc1 = shape("post_network.0.mlp.fc1.bias")[0] if "post_network.0.mlp.fc1.bias" in state_dict else None
    ratio = fc1 / dims[1] if fc1 else None
    name = next((n for n, v in VARIANTS.items()
                 if (tuple(v["layers"]), (v["embed_dims"][0], v["embed_dims"][-1]), v["stem_hidden_dim"],
                     v["mlp_ratio"]) == (layers, dims, stem, ratio)), None)
    return name, shape("pos_embed")[1] * PATCH_SIZE * POOLING_SCALE
