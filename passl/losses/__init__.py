"""Losses: Token Labeling cross-entropy (class token + every patch token) and soft-target CE."""
from passl.losses import token_label  # noqa: F401 (registers)
from passl.losses.token_label import SoftTargetCrossEntropy, TokenLabelCrossEntropy

__all__ = ["TokenLabelCrossEntropy", "SoftTargetCrossEntropy"]
