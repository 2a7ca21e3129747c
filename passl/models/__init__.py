"""Models: LV-ViT (lvvit.py, built from layers.py) and its training output (outputs.py), position-embedding
resizing (pos_embed.py), weight conversion and strict loading (convert.py), parameter / multiply-add
counting (complexity.py)."""
from passl.models.outputs import TokenLabelOutput
from passl.models.lvvit import LVViT, VARIANTS, Variant, lvvit_l, lvvit_m, lvvit_s, lvvit_t
from passl.models.pos_embed import resize_pos_embed
from passl.models.convert import (convert_checkpoint, convert_torch_state_dict, detect_variant, load_pretrained,
                                  read_weights)
from passl.models.complexity import count_macs, count_params, format_summary, summarize

__all__ = ["TokenLabelOutput", "LVViT", "VARIANTS", "Variant", "lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l",
           "resize_pos_embed", "convert_checkpoint", "convert_torch_state_dict", "detect_variant", "load_pretrained",
           "read_weights", "count_macs", "count_params", "format_summary", "summarize"]
