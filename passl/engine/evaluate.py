"""Top-1/top-5 accuracy over a whole validation set, exact whatever the number of processes.

Each process counts hits over its share, masking the sampler's padding (repeated samples that
make the shares equal), and the integer counts are summed across processes. Integer sums do not
depend on the order of addition, so 1, 2 or N processes report the same numbers.
``pick_best`` decides, after each evaluation and by the configured rule, whether the model or its EMA
is the run's new best.
"""
import contextlib

import paddle

from passl.utils.distributed import all_reduce

__all__ = ["topk_hits", "evaluate", "pick_best", "BEST_RULES"]


def topk_hits(logits, labels, valid=None):
    """Hit counts for one batch.

    logits: [B, C]; labels: [B] int64; valid: [B] bool or None (all valid).
    Returns a [3] int64 tensor: (top-1 hits, top-5 hits, valid samples); top-5 means top-min(5, C).
    """
    k = min(5, logits.shape[-1])
    top = paddle.topk(logits.astype("float32"), k=k, axis=-1)[1]
    hit = top == labels.reshape([-1, 1]).astype(top.dtype)
    valid = paddle.ones([logits.shape[0]], dtype="bool") if valid is None else valid
    hit1 = paddle.logical_and(hit[:, 0], valid)
    hit5 = paddle.logical_and(hit.any(axis=-1), valid)
    return paddle.stack([hit1.astype("int64").sum(), hit5.astype("int64").sum(), valid.astype("int64").sum()])


@paddle.no_grad()
def evaluate(model, loader, autocast=None, progress=None):
    """Evaluate ``model`` (returns [B, C] logits in eval mode) on ``loader`` (a passl Loader).

    Returns {'top1': %, 'top5': %, 'num_samples': int}, identical on every process.
    ``autocast`` is a callable returning a context manager (AMP), ``progress`` a bar or None.
    """
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    counts = paddle.zeros([3], dtype="int64")
    for b, batch in enumerate(loader):
        images = batch["image"]
        valid = paddle.to_tensor(loader.sampler.valid_mask(b))
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = model(images)
        counts = counts + topk_hits(logits, batch["label"], valid)
        if progress is not None:
            progress.update(1)
    counts = all_reduce(counts, "sum").numpy()
    if was_training:
        model.train()
    n = int(counts[2])
    return {"top1": 100.0 * counts[0] / max(n, 1), "top5": 100.0 * counts[1] / max(n, 1), "num_samples": n}


BEST_RULES = ("ema", "model", "better")


def pick_best(top1, best, epoch, rule="ema"):
    """The run's new best record if this epoch beats ``best`` under ``rule``, else None.

    top1: {'model': %, 'ema': %} (no 'ema' without an EMA). rule (config ``train.select_best``):
    'ema' scores the EMA alone when there is one, else the model (the reference: its EMA weights are
    the ones selected and published); 'model' scores the model alone; 'better' the higher of the
    two, the EMA on a tie. best: the record so far, {'top1', 'which', 'epoch', 'rule'}, or None before
    the first evaluation; a record kept under another rule (a resumed run whose rule changed; records
    without 'rule' were kept by 'better') scored other weights, so the next evaluation replaces it.
    Returns {'top1', 'which' ('model' | 'ema'), 'epoch', 'rule'} or None.
    """
    if rule not in BEST_RULES:
        raise ValueError(f"rule must be one of {BEST_RULES}, got {rule!r}")
    if rule == "better":
        which = max(top1, key=lambda k: (top1[k], k == "ema"))
    else:
        which = "ema" if rule == "ema" and "ema" in top1 else "model"
    if best is None or best.get("rule", "better") != rule or top1[which] > best["top1"]:
        return {"top1": top1[which], "which": which, "epoch": epoch, "rule": rule}
    return None
