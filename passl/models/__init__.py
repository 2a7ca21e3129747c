"""Models: LV-ViT (lvvit.py), position-embedding resizing (pos_embed.py), weight conversion and
loading (convert.py), parameter / multiply-add counting (complexity.py)."""
from passl.models.lvvit import LVViT, VARIANTS, lvvit_l, lvvit_m, lvvit_s, lvvit_t  # noqa: F401
