"""Models: LV-ViT (lvvit.py, built from layers.py), VOLO (volo.py), plain ViT / DeiT (vit.py), the training
output they share (outputs.py), position-embedding resizing (pos_embed.py), weight conversion and strict
loading (convert.py), parameter / multiply-add counting (complexity.py)."""
from passl.models.outputs import TokenLabelOutput
from passl.models.lvvit import LVViT, VARIANTS, Variant, lvvit_l, lvvit_m, lvvit_s, lvvit_t
from passl.models.volo import VOLO, volo_d1, volo_d2, volo_d3, volo_d4, volo_d5
from passl.models.vit import VisionTransformer, deit_base, deit_small, deit_tiny
from passl.models.pos_embed import resize_pos_embed
from passl.models.convert import (convert_checkpoint, convert_torch_state_dict, detect_variant, load_pretrained,
                                  read_weights)
from passl.models.complexity import count_macs, count_params, format_summary, summarize

__all__ = ["TokenLabelOutput", "LVViT", "VARIANTS", "Variant", "lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l", "VOLO",
           "volo_d1", "volo_d2", "volo_d3", "volo_d4", "volo_d5", "VisionTransformer", "deit_tiny", "deit_small",
           "deit_base", "resize_pos_embed", "convert_checkpoint", "convert_torch_state_dict", "detect_variant",
           "load_pretrained", "read_weights", "count_macs", "count_params", "format_summary", "summarize"]
