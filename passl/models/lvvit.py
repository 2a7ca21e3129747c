"""LV-ViT (Jiang et al., "All Tokens Matter", NeurIPS 2021): the model and its published variants.

Layer and parameter names follow the reference PyTorch release, so a converted checkpoint maps
key for key (see passl/models/convert.py). The building blocks (stems, attention / MLP / block,
MixToken) are in passl/models/layers.py and importable from here; this file holds the stem table,
the LVViT layer, then the published variants as rows of data, each registered as a model.
"""
import inspect
from typing import NamedTuple

import numpy as np
import paddle
import paddle.nn as nn

from passl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from passl.errors import ConfigError
from passl.models.layers import (Attention, Block, ConvStem, DropPath, Mlp, PatchConv,  # noqa: F401 (re-exported)
                                 TokenLabelModel, _linear, _trunc_normal, box_mask, draw_mix_box, mix_tokens)
from passl.ranges import DropRate, NonNegativeFloat, PositiveFloat, PositiveInt
from passl.registry import MODELS

__all__ = ["LVViT", "ConvStem", "PatchConv", "Attention", "Mlp", "Block", "DropPath", "draw_mix_box", "box_mask",
           "mix_tokens", "Variant", "VARIANTS", "STEMS", "lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l"]

# ---------------------------------------------------------------------------------------------
# stems by name: images [B, 3, H, W] -> token maps [B, D, H/16, W/16]

STEMS = {
    "pe4_2": lambda in_chans, embed_dim, patch_size: ConvStem(in_chans, embed_dim, patch_size, width=64),
    "pe4_2_128": lambda in_chans, embed_dim, patch_size: ConvStem(in_chans, embed_dim, patch_size, width=128),
    "patch16": lambda in_chans, embed_dim, patch_size: PatchConv(in_chans, embed_dim, patch_size),
}


# ---------------------------------------------------------------------------------------------
# the model

class LVViT(TokenLabelModel):
    """LV-ViT: conv stem, cls token + learned position embedding, ``depth`` blocks, final LayerNorm,
    ``head`` on the cls token and ``aux_head`` on every patch token.

    Forward (images [B, in_chans, H, W], H and W = the ``img_size`` the model was built for):
      - train: a ``TokenLabelOutput`` (passl/models/outputs.py): ``cls_logits`` [B, C], ``aux_logits``
        [B, N, C] and, with mix_token, the ``mix_box`` (int64 [4], row1, col1, row2, col2 on the token
        grid) inside which tokens came from batch row B-1-i; aux is un-mixed, so row i always describes
        image i. With ``return_dense`` false: ``TokenLabelOutput(cls_logits)``, no MixToken (the loss
        could not mix the targets).
      - eval: ``cls + aux_weight * max over tokens of aux`` [B, C] per sample (return_dense), else ``cls``.
    """

    def __init__(self, img_size: PositiveInt = 224, patch_size: PositiveInt = 16, in_chans: PositiveInt = 3,
                 num_classes: PositiveInt = 1000, embed_dim: PositiveInt = 384, depth: PositiveInt = 16,
                 num_heads: PositiveInt = 6, mlp_ratio: PositiveFloat = 3.0, qkv_bias: bool = False,
                 drop_rate: DropRate = 0.0, attn_drop_rate: DropRate = 0.0, drop_path_rate: DropRate = 0.0,
                 stem: str = "pe4_2", skip_lam: PositiveFloat = 1.0, mix_token: bool = True, return_dense: bool = True,
                 aux_weight: NonNegativeFloat = 0.5):
        super().__init__()
        if stem not in STEMS:
            raise ConfigError(f"model.stem '{stem}' is unknown; use one of {', '.join(STEMS)}")
        self.set_geometry(img_size, patch_size, num_classes, embed_dim, mix_token, return_dense, aux_weight)
        # how images are prepared for evaluation (SPEC 5); a published variant sets its own (VARIANTS)
        self.eval_cfg = dict(crop_pct=0.9, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)

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

    # -- pieces, in forward order (embed: TokenLabelModel's stem call and grid check) -------------
    def tokens(self, grid_maps):
        """[B, D, h, w] -> [B, 1 + h*w, D]: flatten, prepend the cls token, add pos_embed."""
        x = grid_maps.flatten(2).transpose([0, 2, 1])
        cls = self.cls_token.expand([x.shape[0], 1, self.embed_dim])
        return self.pos_drop(paddle.concat([cls.astype(x.dtype), x], axis=1) + self.pos_embed)

    def forward_features(self, images, mix_box=None):
        """images [B, C_in, H, W] -> [B, 1 + N, D] tokens after the final LayerNorm.

        mix_box: int64 [4] or None; MixToken: inside the box, the stem output of sample i is replaced
        by that of sample B-1-i before the cls token and pos_embed are added (SPEC 2)."""
        x = self.embed(images)                                              # [B, D, h, w]
        if mix_box is not None:
            x = mix_tokens(x, box_mask(mix_box, *self.grid_size))
        x = self.tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, features):
        """features [B, 1 + N, D] -> (cls_logits [B, C], aux_logits [B, N, C], or None without return_dense)."""
        cls_logits = self.head(features[:, 0])
        aux_logits = self.aux_head(features[:, 1:]) if self.return_dense else None
        return cls_logits, aux_logits

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
        mixing = self.training and self.mix_token and self.return_dense
        mix_box = draw_mix_box(*self.grid_size) if mixing else None
        cls_logits, aux_logits = self.forward_head(self.forward_features(images, mix_box))
        return self.head_outputs(cls_logits, aux_logits, mix_box)   # eval fusion, or aux un-mixed


# ---------------------------------------------------------------------------------------------
# published variants: rows of data, each registered as a model whose keywords show its defaults

class Variant(NamedTuple):
    """One published LV-ViT (SPEC 1).

    arch: the LVViT keywords its name fixes (conversion matches a checkpoint's shapes against them).
    defaults: the variant's own defaults of keywords a config may still set (img_size, drop_path_rate).
    crop_pct: eval crop of its published weights at 224 px; the fine-tuned sizes (384, 448, 512) use 1.0.
    """
    arch: dict
    defaults: dict
    crop_pct: float

    def eval_cfg(self, img_size):
        """The eval preprocessing of this variant at ``img_size`` (int or (h, w)), as LVViT.eval_cfg."""
        side = img_size if isinstance(img_size, int) else max(img_size)
        return dict(crop_pct=self.crop_pct if side <= 224 else 1.0, interpolation="bicubic",
                    mean=IMAGENET_MEAN, std=IMAGENET_STD)


# shared by every variant: patch 16, mlp_ratio 3, no qkv bias
_FAMILY = dict(patch_size=16, mlp_ratio=3.0, qkv_bias=False)

VARIANTS = {
    "lvvit_t": Variant(dict(embed_dim=240, depth=12, num_heads=4, stem="pe4_2", skip_lam=1.0),
                       dict(img_size=224, drop_path_rate=0.1), crop_pct=0.9),
    "lvvit_s": Variant(dict(embed_dim=384, depth=16, num_heads=6, stem="pe4_2", skip_lam=2.0),
                       dict(img_size=224, drop_path_rate=0.1), crop_pct=0.9),
    "lvvit_m": Variant(dict(embed_dim=512, depth=20, num_heads=8, stem="pe4_2", skip_lam=2.0),
                       dict(img_size=224, drop_path_rate=0.2), crop_pct=1.0),
    # published at 448 and 512 only, hence the default img_size
    "lvvit_l": Variant(dict(embed_dim=768, depth=24, num_heads=12, stem="pe4_2_128", skip_lam=3.0),
                       dict(img_size=448, drop_path_rate=0.3), crop_pct=1.0),
}


def _register_variant(name):
    """Register ``name`` in MODELS as a factory taking LVViT's keywords minus the fixed architecture,
    with the variant's defaults, so that ``inspect.signature`` (and config validation) shows them."""
    variant = VARIANTS[name]
    fixed = {**_FAMILY, **variant.arch}
    signature = inspect.Signature([
        param.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=variant.defaults.get(param.name, param.default))
        for param in inspect.signature(LVViT).parameters.values() if param.name not in fixed])

    def factory(**kwargs):
        bound = signature.bind(**kwargs)   # TypeError for an architecture keyword or a typo
        bound.apply_defaults()
        model = LVViT(**fixed, **bound.arguments)
        model.eval_cfg = variant.eval_cfg(model.img_size)
        return model

    factory.__name__ = factory.__qualname__ = name
    factory.__signature__ = signature
    factory.__doc__ = (f"{name}: LVViT with {', '.join(f'{k}={v}' for k, v in variant.arch.items())} "
                       f"(patch 16, mlp_ratio 3); the other keywords as LVViT, with this variant's defaults.")
    return MODELS.register(name)(factory)


MODELS.register("LVViT")(LVViT)
lvvit_t = _register_variant("lvvit_t")
lvvit_s = _register_variant("lvvit_s")
lvvit_m = _register_variant("lvvit_m")
lvvit_l = _register_variant("lvvit_l")
