"""Plain ViT / DeiT (Dosovitskiy et al. 2021; Touvron et al. 2021) with token labeling: the simplest
backbone, for users who bring their own ViT.

The layout is timm's ``VisionTransformer`` (DeiT's own code uses it): ``patch_embed.proj`` (one conv of
kernel = stride = 16), ``cls_token``, ``pos_embed`` [1, 1 + N, D], pre-norm ``blocks`` (LayerNorm eps 1e-6,
qkv with bias, MLP ratio 4), ``norm``, ``head``; so timm / DeiT checkpoints convert key for key. Token
labeling adds ``aux_head`` on every patch token and MixToken, exactly as in LV-ViT. A checkpoint without
``aux_head`` (every timm / DeiT one) loads with a zero ``aux_head`` (see ``complete_weights``).
Read top to bottom: patch embedding, block, the model, variants, checkpoint recognition.
"""

import numpy as np
import paddle
import paddle.nn as nn
from paddle.nn.initializer import Uniform

from passl.errors import CheckpointError, ConfigError
from passl.models.layers import (Attention, DropPath, Mlp, TokenLabelModel, _linear, _trunc_normal, box_mask,
                                 draw_mix_box, mix_tokens)
from passl.models.pos_embed import pos_embed_grid
from passl.ranges import DropRate, NonNegativeFloat, PositiveFloat, PositiveInt
from passl.registry import MODELS

__all__ = ["VisionTransformer", "PatchEmbed", "ViTBlock", "VARIANTS", "PARAMS", "match_state_dict",
           "deit_tiny", "deit_small", "deit_base"]

class PatchEmbed(nn.Layer):
    """One conv of kernel = stride = ``patch_size`` (PyTorch's default conv init, as timm leaves it)."""

    def __init__(self, in_chans=3, embed_dim=768, patch_size=16):
        super().__init__()
        bound = 1.0 / np.sqrt(in_chans * patch_size * patch_size)
        attr = lambda: paddle.ParamAttr(initializer=Uniform(-bound, bound))  # noqa: E731
        self.proj = nn.Conv2D(in_chans, embed_dim, patch_size, stride=patch_size, weight_attr=attr(),
                              bias_attr=attr())

    def forward(self, images):
        """images: [B, 3, H, W] -> [B, D, H/patch, W/patch]"""
        return self.proj(images)


class ViTBlock(nn.Layer):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); LayerNorm eps ``norm_eps``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, epsilon=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, epsilon=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        """x: [B, T, D] -> [B, T, D]"""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(TokenLabelModel):
    """ViT: patch embedding, cls token + learned position embedding, ``depth`` blocks, final LayerNorm,
    ``head`` on the cls token and ``aux_head`` on every patch token.

    Forward (images [B, in_chans, H, W], H and W = the ``img_size`` the model was built for):
      - train, return_dense: ``TokenLabelOutput(cls [B, C], aux [B, N, C], box)``; with mix_token, tokens
        inside ``box`` (int64 [4], row1, col1, row2, col2 on the token grid) come from batch row B-1-i, and
        ``aux`` is un-mixed so row i always describes image i; ``box`` is None without mix_token.
      - train, not return_dense: ``TokenLabelOutput(cls)`` (no MixToken: the loss could not mix the targets).
      - eval: ``cls + aux_weight * max over tokens of aux`` [B, C] (return_dense), else ``cls``.
    """

    def __init__(self, img_size: PositiveInt = 224, patch_size: PositiveInt = 16, in_chans: PositiveInt = 3,
                 num_classes: PositiveInt = 1000, embed_dim: PositiveInt = 768, depth: PositiveInt = 12,
                 num_heads: PositiveInt = 12, mlp_ratio: PositiveFloat = 4.0, qkv_bias: bool = True,
                 drop_rate: DropRate = 0.0, attn_drop_rate: DropRate = 0.0, drop_path_rate: DropRate = 0.0,
                 norm_eps: PositiveFloat = 1e-6, mix_token: bool = True, return_dense: bool = True,
                 aux_weight: NonNegativeFloat = 0.5):
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"model.embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.set_geometry(img_size, patch_size, num_classes, embed_dim, mix_token, return_dense, aux_weight)

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=_trunc_normal)
        self.pos_embed = self.create_parameter([1, self.num_tokens + 1, embed_dim], default_initializer=_trunc_normal)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = np.linspace(0.0, drop_path_rate, depth) if depth else []  # stochastic depth rises from 0
        self.blocks = nn.LayerList([
            ViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, float(r), norm_eps)
            for r in rates])
        self.norm = nn.LayerNorm(embed_dim, epsilon=norm_eps)
        self.head = _linear(embed_dim, num_classes)            # trunc normal .02 (timm's), zero bias
        self.aux_head = _linear(embed_dim, num_classes)

    def complete_weights(self, weights, log=print):
        """Weights (Paddle layout, {key: array}) with what a timm / DeiT checkpoint lacks filled in: an
        ``aux_head`` of zeros, so that the eval output (cls + aux_weight * max of aux) equals the cls head's
        output exactly until token labeling trains the dense head. Other weights are returned as they are."""
        if any(k.startswith("aux_head.") for k in weights) or "head.weight" not in weights:
            return weights
        weights = dict(weights)
        head_weight = np.asarray(weights["head.weight"])
        weights["aux_head.weight"] = np.zeros(head_weight.shape, head_weight.dtype)     # (D, C)
        weights["aux_head.bias"] = np.zeros(head_weight.shape[1:], head_weight.dtype)   # (C,)
        log(f"no aux_head in the weights: aux_head set to zero ({head_weight.shape[1]} classes), so the eval output "
            "is the cls head's until token labeling trains it")
        return weights

    # -- pieces (embed: TokenLabelModel's patch embedding and grid check) ------------------------
    def forward_tokens(self, grid_maps):
        """[B, D, h, w] -> [B, 1 + h*w, D]: flatten, prepend the cls token, add pos_embed, blocks, norm."""
        x = grid_maps.flatten(2).transpose([0, 2, 1])
        cls = self.cls_token.expand([x.shape[0], 1, self.embed_dim]).astype(x.dtype)
        x = self.pos_drop(paddle.concat([cls, x], axis=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, images):
        """images [B, C_in, H, W] -> [B, 1 + N, D] tokens after the final LayerNorm (never mixed)."""
        return self.forward_tokens(self.embed(images))

    def forward(self, images):
        """See the class docstring for the outputs of each mode."""
        x = self.embed(images)                                  # [B, D, h, w]
        mixing = self.training and self.mix_token and self.return_dense
        box = draw_mix_box(*self.grid_size) if mixing else None
        if box is not None:   # MixToken: inside the box, sample i's patches are sample B-1-i's
            x = mix_tokens(x, box_mask(box, *self.grid_size))
        x = self.forward_tokens(x)
        cls_logits = self.head(x[:, 0])                                                # [B, C]
        aux_logits = self.aux_head(x[:, 1:]) if self.return_dense else None           # [B, N, C]
        return self.head_outputs(cls_logits, aux_logits, box)   # eval fusion, or aux un-mixed


# ---------------------------------------------------------------------------------------------
# published variants (DeiT's, patch 16; drop path 0.1 as in DeiT's recipe). Parameter counts: timm's
# models without aux_head, plus aux_head (D x 1000 + 1000) here.

VARIANTS = {
    "deit_tiny": dict(embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1),
    "deit_small": dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
    "deit_base": dict(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1),
}

PARAMS = {"deit_tiny": 5_717_416, "deit_small": 22_050_664, "deit_base": 86_567_656}   # timm, without aux_head


def _variant(name, summary):
    """The registered factory of a variant: VisionTransformer with the variant's table entry as defaults."""
    return MODELS.register_variant(name, VisionTransformer, VARIANTS[name],
                                   f"{summary}; {PARAMS[name]:,} parameters without aux_head at 1000 classes.")


MODELS.register("VisionTransformer")(VisionTransformer)
deit_tiny = _variant("deit_tiny", "DeiT-Ti: dim 192, depth 12, 3 heads, 72.2 top-1 at 224 (DeiT, no distillation)")
deit_small = _variant("deit_small", "DeiT-S: dim 384, depth 12, 6 heads, 79.8 top-1 at 224 (DeiT, no distillation)")
deit_base = _variant("deit_base", "DeiT-B: dim 768, depth 12, 12 heads, 81.8 top-1 at 224 (DeiT, no distillation)")


# ---------------------------------------------------------------------------------------------
# checkpoint recognition (used by passl.models.convert.detect_variant)

def match_state_dict(state_dict):
    """(variant name or None, img_size) if ``state_dict`` (prefixes stripped, PyTorch or Paddle layout)
    is a plain ViT's (a single-conv ``patch_embed.proj`` and qkv with bias), else None."""
    if ("patch_embed.proj.weight" not in state_dict or "patch_embed.conv1.weight" in state_dict
            or "blocks.0.attn.qkv.bias" not in state_dict or "pos_embed" not in state_dict):
        return None
    if "dist_token" in state_dict:
        raise CheckpointError("a distilled DeiT (dist_token, head_dist) is not supported; "
                              "use the plain deit_*_patch16 weights")

    def shape(key):
        return tuple(state_dict[key].shape)

    dim = shape("pos_embed")[-1]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.") and k.endswith(".norm1.weight")})
    patch = shape("patch_embed.proj.weight")[-1]
    hidden = shape("blocks.0.mlp.fc1.bias")[0] if "blocks.0.mlp.fc1.bias" in state_dict else None
    side = pos_embed_grid(shape("pos_embed"))[0]
    name = next((n for n, v in VARIANTS.items()
                 if (v["embed_dim"], v["depth"], 4 * v["embed_dim"], 16) == (dim, depth, hidden, patch)), None)
    return name, side * patch
