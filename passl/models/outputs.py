"""What a token-labeling model returns in training mode; losses read its fields by name."""
from typing import NamedTuple, Optional

import paddle

__all__ = ["TokenLabelOutput"]


class TokenLabelOutput(NamedTuple):
    """Training-mode model output.

    cls_logits: [B, C] class-token logits.
    aux_logits: [B, N, C] logits per patch token, un-mixed so that row i describes image i; None for a
        model trained on the class token only.
    mix_box: int64 [4] (row1, col1, row2, col2), end-exclusive, on the token grid of aux_logits: the
        MixToken box of this batch, or None when no MixToken was applied (the box may be empty).
    """

    cls_logits: paddle.Tensor
    aux_logits: Optional[paddle.Tensor] = None
    mix_box: Optional[paddle.Tensor] = None
