"""Token Labeling loss (SPEC 3) computed from the compact targets of passl/data/targets.py.

A token's target over C classes is ``t = (1 - s) * p + s / C`` where ``p`` is ``probs[u]`` for the
U listed classes and ``bg`` for each other class. With logp = log_softmax(aux):

    -sum_c t_c logp_c = -((1 - s) bg + s / C) * sum_c logp_c  -  (1 - s) * sum_u (probs_u - bg) logp_{class_u}

and sum_c logp_c = sum_c aux_c - C * logsumexp(aux), so the dense term needs a softmax and a sum
over [B, N, C] plus a gather of [B, N, U] -- no [B, N, C] target is ever built, and its gradient is
written out (_DenseSoftCrossEntropy, see there why). The class-token target is small ([B, C])
and is built densely on device, then blended with the ground truth (optional) and mixed for
MixToken: lam = 1 - box_area / N, t = lam t + (1 - lam) t[reversed batch].
Images without label maps (or batches without compact targets) use the smoothed one-hot label.

Both losses take ``(outputs, batch)``: the model's training output, a TokenLabelOutput
(passl/models/outputs.py) read by field name, and the collated batch as paddle tensors.
"""
import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from passl.errors import ModelOutputError
from passl.models.outputs import TokenLabelOutput
from passl.ranges import NonNegativeFloat, ranged
from passl.registry import LOSSES

__all__ = ["TokenLabelCrossEntropy", "SoftTargetCrossEntropy", "class_target", "mix_class_target",
           "dense_token_loss", "soft_cross_entropy", "unused_outputs_term"]


Smoothing = ranged(float, 0, 1, high_open=True)   # s = 1 would make every target uniform


def _checked(outputs, loss_name):
    """``outputs`` if it is a TokenLabelOutput, else ModelOutputError saying what the model must return."""
    if not isinstance(outputs, TokenLabelOutput):
        raise ModelOutputError(
            f"{loss_name} reads a TokenLabelOutput(cls_logits, aux_logits, mix_box) (passl.models.outputs), "
            f"but the model returned {type(outputs).__name__}; a model trained with this loss must return "
            "TokenLabelOutput in training mode (aux_logits and mix_box may be None)")
    if outputs.mix_box is not None and outputs.aux_logits is None:
        raise ModelOutputError(f"{loss_name}: the model returned a mix_box without aux_logits; the class target "
                               "is mixed by the box's share of the aux token grid, so return both or neither")
    return outputs


def _compact(batch, num_tokens):
    """(classes [B, U] int64, token_probs [B, N, U], token_bg [B, N], cls_probs [B, U], cls_bg [B]);
    the one-hot label (U = 1, probs 1, bg 0) when the batch has no compact targets."""
    if "target_classes" in batch:
        return (batch["target_classes"], batch["token_probs"].astype("float32"), batch["token_bg"].astype("float32"),
                batch["cls_probs"].astype("float32"), batch["cls_bg"].astype("float32"))
    label = batch["label"].astype("int64").reshape([-1, 1])
    size = label.shape[0]
    ones = paddle.ones([size, max(num_tokens, 1), 1], "float32")
    return label, ones, paddle.zeros([size, max(num_tokens, 1)], "float32"), ones[:, 0], paddle.zeros([size], "float32")


def _token_weight(batch, size, num_tokens):
    """[B, N] float32: 1 for a token with a dense target, 0 for one outside its label map's coverage
    (targets.py); all ones when the batch carries no weights."""
    if "token_weight" in batch:
        return batch["token_weight"].astype("float32")
    return paddle.ones([size, num_tokens], "float32")


def class_target(batch, num_classes, smoothing=0.1, ground_truth=False):
    """Smoothed class-token target [B, C] (float32): (1 - s) p + s / C from the compact ``cls_probs`` /
    ``cls_bg`` (or the one-hot label), blended with the smoothed one-hot label when ``ground_truth``:
    r = 0.9 - 0.4 [argmax g == argmax t]; t = r t + (1 - r) g."""
    classes, _, _, probs, bg = _compact(batch, 0)
    valid = classes >= 0
    index = paddle.where(valid, classes, paddle.zeros_like(classes))
    weight = paddle.where(valid, probs - bg.unsqueeze(1), paddle.zeros_like(probs))
    size = classes.shape[0]
    dense = paddle.put_along_axis(bg.unsqueeze(1).expand([size, num_classes]).clone(), index, weight, axis=1,
                                  reduce="add")
    target = (1.0 - smoothing) * dense + smoothing / num_classes
    if ground_truth:
        label = batch["label"].astype("int64").reshape([-1])
        truth = (1.0 - smoothing) * F.one_hot(label, num_classes) + smoothing / num_classes
        agree = (truth.argmax(-1) == target.argmax(-1)).astype("float32").unsqueeze(1)
        ratio = 0.9 - 0.4 * agree
        target = ratio * target + (1.0 - ratio) * truth
    return target


def mix_class_target(target, box, num_tokens):
    """MixToken: target [B, C], box int64 [4] (row1, col1, row2, col2, end-exclusive) or None.
    lam = 1 - area / N; returns lam t + (1 - lam) t[::-1] (identity for an empty box, no host sync)."""
    if box is None:
        return target
    box = box.astype("float32")
    area = (box[2] - box[0]) * (box[3] - box[1])
    lam = 1.0 - area / float(num_tokens)
    return lam * target + (1.0 - lam) * target[::-1]


def unused_outputs_term(*outputs):
    """0 * the sum of every tensor in ``outputs`` (None skipped): a 0-d float32 zero that keeps
    outputs a loss does not read (aux_logits with ``dense_weight: 0``) in the backward graph.

    Why: under ``paddle.DataParallel`` every parameter that produced a model output must receive a
    gradient, or Paddle 3.3 stops at the next step asking for ``find_unused_parameters=True``; that
    flag alone does not help, because Paddle finds the parameters from the outputs, and an output
    the loss never reads still marks them as used. A zero-weighted term gives them exact zero
    gradients, as the reference's ``0 * loss`` does: AdamW then moves them by its decoupled weight
    decay only, the same with one process or many.
    """
    terms = [t.astype("float32").sum() for t in outputs if t is not None]
    return 0.0 * paddle.add_n(terms) if terms else paddle.zeros([], "float32")


def soft_cross_entropy(logits, target):
    """mean over rows of -sum_c target_c log_softmax(logits)_c. logits, target: [B, C]."""
    return -(target * F.log_softmax(logits.astype("float32"), axis=-1)).sum(-1).mean()


def dense_token_loss(aux, batch, smoothing=0.1):
    """Mean over the B x N tokens that have a target (``token_weight`` 1: all of them unless a label map
    leaves some uncovered) of the soft cross-entropy of aux [B, N, C] against the compact token targets."""
    aux = aux.astype("float32")
    size, tokens, num_classes = aux.shape
    classes, probs, bg, _, _ = _compact(batch, tokens)
    valid = (classes >= 0).unsqueeze(1)                                          # [B, 1, U]
    index = paddle.where(classes >= 0, classes, paddle.zeros_like(classes)).unsqueeze(1)
    index = index.expand([size, tokens, classes.shape[1]])                      # [B, N, U]
    weight = paddle.where(valid, probs - bg.unsqueeze(-1), paddle.zeros_like(probs))
    token_weight = _token_weight(batch, size, tokens)
    # 1 / (tokens with targets), kept on the device (no host sync); 0 when no token has one
    share = token_weight / paddle.clip(token_weight.sum(), min=1.0)
    return _DenseSoftCrossEntropy.apply(aux, index, weight, bg, share, float(smoothing))


class _DenseSoftCrossEntropy(PyLayer):
    """The dense term with its gradient written out, so that [B, N, C] is touched in a few passes.

    The result is sum over tokens of share * loss, share = token_weight / sum(token_weight): the mean
    over the tokens that have targets. Per token, with a = (1 - s) bg + s / C, w_u = probs_u - bg
    (0 for padding), W = sum_u w_u:
        loss = -a sum_c z_c + (a C + (1 - s) W) lse - (1 - s) sum_u w_u z_{class_u}
        dloss/dz_c = (a C + (1 - s) W) softmax(z)_c - a - (1 - s) sum_u w_u [class_u = c]
    lse = max z - log(max softmax z): exact, and max softmax >= 1/C keeps the log well conditioned.

    This is the loss's formulation on every device, not a CPU trick. Autograd through logsumexp, sum
    and take_along_axis makes three [B, N, C] gradients and adds them; here backward is one [B, N, C]
    block (the saved softmax, updated in place). On the CPU for [16, 196, 1000], U = 24
    (benchmarks/bench_cpu_fast.py, row dense_loss): forward + backward 44 ms instead of 107 (wall; CPU
    time 51 vs 213 ms), and the peak above the input 24.8 MB instead of 37.0 (two 12 MB blocks instead
    of three). On a GPU
    these elementwise passes are memory-bound, so fewer passes and one block less at the peak (~100 MB
    of fp32 at batch 128, 224 px, 1000 classes) carry over.
    """

    @staticmethod
    def forward(ctx, aux, index, weight, bg, share, smoothing):
        num_classes = aux.shape[-1]
        prob = F.softmax(aux, axis=-1)                                           # [B, N, C]
        lse = aux.max(-1) - paddle.log(prob.max(-1))                             # [B, N]
        a = (1.0 - smoothing) * bg + smoothing / num_classes
        coef = a * num_classes + (1.0 - smoothing) * weight.sum(-1)
        picked = (weight * paddle.take_along_axis(aux, index, axis=2)).sum(-1)
        per_token = coef * lse - a * aux.sum(-1) - (1.0 - smoothing) * picked
        ctx.save_for_backward(prob, index, weight, a, coef, share)
        ctx.smoothing = smoothing
        return (share * per_token).sum()

    @staticmethod
    def backward(ctx, grad):
        prob, index, weight, a, coef, share = ctx.saved_tensor()
        scale = grad * share                                                     # d loss / d per_token, [B, N]
        # in place on the saved softmax, which only this backward reads: a new [B, N, C] block per
        # op costs more than the op itself on the CPU
        out = prob.multiply_((coef * scale).unsqueeze(-1)).subtract_((a * scale).unsqueeze(-1))
        return out.put_along_axis_(index, -(1.0 - ctx.smoothing) * scale.unsqueeze(-1) * weight, axis=2,
                                   reduce="add"), None, None, None, None


@LOSSES.register()
class TokenLabelCrossEntropy(paddle.nn.Layer):
    """cls_weight * SoftCE(cls, t_cls) + dense_weight * mean_{B,N} SoftCE(aux, t_token).

    Call ``loss(outputs, batch) -> {"loss", "loss_cls", "loss_dense"}`` (scalar tensors) with the
    model's ``TokenLabelOutput`` (cls_logits [B, C], aux_logits [B, N, C] or None: then only the class
    term, mix_box) and the collated batch as paddle tensors. smoothing: label smoothing s;
    ground_truth: blend the cls target with the image label (reference flag, off by default).
    """

    def __init__(self, cls_weight: NonNegativeFloat = 1.0, dense_weight: NonNegativeFloat = 1.0,
                 smoothing: Smoothing = 0.1, ground_truth: bool = False):
        super().__init__()
        self.cls_weight, self.dense_weight = cls_weight, dense_weight
        self.smoothing, self.ground_truth = smoothing, ground_truth

    def forward(self, outputs, batch):
        cls_logits, aux_logits, mix_box = _checked(outputs, "TokenLabelCrossEntropy")
        target = class_target(batch, cls_logits.shape[-1], self.smoothing, self.ground_truth)
        if aux_logits is not None:
            target = mix_class_target(target, mix_box, aux_logits.shape[1])
        loss_cls = soft_cross_entropy(cls_logits, target)
        out = {"loss_cls": loss_cls}
        if aux_logits is not None and self.dense_weight != 0:
            loss_dense = dense_token_loss(aux_logits, batch, self.smoothing)
            out["loss_dense"] = loss_dense
            out["loss"] = self.cls_weight * loss_cls + self.dense_weight * loss_dense
        else:
            out["loss_dense"] = paddle.zeros([], "float32")
            out["loss"] = self.cls_weight * loss_cls + unused_outputs_term(aux_logits)
        return out


@LOSSES.register()
class SoftTargetCrossEntropy(paddle.nn.Layer):
    """Class-token-only training: SoftCE(cls, t_cls) with the batch's class target (pooled label map,
    or the smoothed one-hot label), mixed for MixToken when the TokenLabelOutput carries a mix_box.
    Returns {"loss", "loss_cls"}."""

    def __init__(self, smoothing: Smoothing = 0.1):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, outputs, batch):
        cls_logits, aux_logits, mix_box = _checked(outputs, "SoftTargetCrossEntropy")
        target = class_target(batch, cls_logits.shape[-1], self.smoothing)
        if aux_logits is not None:
            target = mix_class_target(target, mix_box, aux_logits.shape[1])
        loss = soft_cross_entropy(cls_logits, target)
        return {"loss": loss + unused_outputs_term(aux_logits), "loss_cls": loss}
