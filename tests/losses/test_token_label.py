"""TokenLabelCrossEntropy / SoftTargetCrossEntropy against dense references written here in numpy."""
import numpy as np
import paddle
import pytest

import passl
from passl.errors import ModelOutputError
from passl.losses.token_label import class_target
from passl.models.outputs import TokenLabelOutput

B, N, C, S = 4, 6, 11, 0.1


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def random_compact(rng, pad=2):
    """Compact targets of B samples: a few listed classes with probabilities, the rest sharing bg."""
    classes = np.full((B, 5 + pad), -1, np.int64)
    token_probs = np.zeros((B, N, 5 + pad), np.float32)
    cls_probs = np.zeros((B, 5 + pad), np.float32)
    token_bg, cls_bg = np.zeros((B, N), np.float32), np.zeros(B, np.float32)
    for b in range(B):
        count = rng.integers(1, 6)
        classes[b, :count] = rng.choice(C, count, replace=False)
        logits = rng.normal(0, 2, (N + 1, count))
        # softmax over C classes whose unlisted logits are 0
        full = np.concatenate([logits, np.zeros((N + 1, C - count))], 1)
        probs = np.exp(full) / np.exp(full).sum(1, keepdims=True)
        token_probs[b, :, :count], token_bg[b] = probs[:N, :count], probs[:N, -1]
        cls_probs[b, :count], cls_bg[b] = probs[N, :count], probs[N, -1]
    return {"label": rng.integers(0, C, B), "target_classes": classes, "token_probs": token_probs,
            "token_bg": token_bg, "cls_probs": cls_probs, "cls_bg": cls_bg}


def dense(fields, b, probs_key, bg_key):
    """Unsmoothed dense distribution(s) of sample b: [..., C]."""
    probs, bg = fields[probs_key][b], fields[bg_key][b]
    out = np.repeat(np.asarray(bg, np.float64)[..., None], C, axis=-1)
    for u, c in enumerate(fields["target_classes"][b]):
        if c >= 0:
            out[..., c] = probs[..., u]
    return out


def reference_loss(cls, aux, fields, box=None, cls_weight=1.0, dense_weight=1.0, smoothing=S):
    t_tok = np.stack([dense(fields, b, "token_probs", "token_bg") for b in range(B)])   # [B, N, C]
    t_cls = np.stack([dense(fields, b, "cls_probs", "cls_bg") for b in range(B)])       # [B, C]
    t_tok = (1 - smoothing) * t_tok + smoothing / C
    t_cls = (1 - smoothing) * t_cls + smoothing / C
    if box is not None:
        lam = 1 - (box[2] - box[0]) * (box[3] - box[1]) / N
        t_cls = lam * t_cls + (1 - lam) * t_cls[::-1]
    loss_cls = -(t_cls * log_softmax(cls)).sum(-1).mean()
    loss_dense = -(t_tok * log_softmax(aux)).sum(-1).mean()
    return cls_weight * loss_cls + dense_weight * loss_dense, loss_cls, loss_dense


def to_paddle(fields):
    return {k: paddle.to_tensor(v) for k, v in fields.items()}


def outputs(rng, box=None):
    cls = rng.normal(0, 3, (B, C)).astype(np.float32)
    aux = rng.normal(0, 3, (B, N, C)).astype(np.float32)
    tensors = TokenLabelOutput(paddle.to_tensor(cls, stop_gradient=False), paddle.to_tensor(aux, stop_gradient=False),
                               None if box is None else paddle.to_tensor(np.array(box), dtype="int64"))
    return cls, aux, tensors


def test_matches_dense_reference_without_and_with_mix():
    rng = np.random.default_rng(0)
    fields = random_compact(rng)
    loss_fn = passl.build_loss({"name": "TokenLabelCrossEntropy", "cls_weight": 0.7, "dense_weight": 1.3})
    for box in (None, [0, 1, 2, 3], [1, 1, 1, 3]):           # no mix; area 4 of 6 tokens; empty box
        cls, aux, out = outputs(rng, box)
        got = loss_fn(out, to_paddle(fields))
        want, want_cls, want_dense = reference_loss(cls, aux, fields, box, 0.7, 1.3)
        assert float(got["loss"]) == pytest.approx(want, rel=1e-5)
        assert float(got["loss_cls"]) == pytest.approx(want_cls, rel=1e-5)
        assert float(got["loss_dense"]) == pytest.approx(want_dense, rel=1e-5)


def test_gradient_matches_dense_reference():
    rng = np.random.default_rng(1)
    fields = random_compact(rng)
    cls, aux, out = outputs(rng, [0, 0, 1, 3])
    passl.build_loss({"name": "TokenLabelCrossEntropy"})(out, to_paddle(fields))["loss"].backward()
    # d loss / d aux = (softmax(aux) - t) / (B N) for a soft-target CE averaged over B and N
    t_tok = np.stack([dense(fields, b, "token_probs", "token_bg") for b in range(B)]) * (1 - S) + S / C
    want = (np.exp(log_softmax(aux)) - t_tok) / (B * N)
    np.testing.assert_allclose(out[1].grad.numpy(), want, atol=1e-6)


def test_tokens_without_targets_are_left_out_of_the_dense_mean():
    """token_weight 0 (outside a label map's coverage): the dense term is the mean over the other
    tokens, and those tokens get no gradient."""
    rng = np.random.default_rng(5)
    fields = random_compact(rng)
    token_weight = (rng.random((B, N)) < 0.6).astype(np.float32)
    token_weight[0] = 0.0                                            # a sample with no dense target at all
    fields["token_weight"] = token_weight
    cls, aux, out = outputs(rng)
    got = passl.build_loss({"name": "TokenLabelCrossEntropy"})(out, to_paddle(fields))
    t_tok = np.stack([dense(fields, b, "token_probs", "token_bg") for b in range(B)]) * (1 - S) + S / C
    per_token = -(t_tok * log_softmax(aux)).sum(-1)                                      # [B, N]
    kept = token_weight > 0
    assert float(got["loss_dense"]) == pytest.approx(per_token[kept].mean(), rel=1e-5)
    got["loss"].backward()
    want = (np.exp(log_softmax(aux)) - t_tok) * token_weight[..., None] / kept.sum()
    np.testing.assert_allclose(out[1].grad.numpy(), want, atol=1e-6)
    assert not out[1].grad.numpy()[~kept].any()
    # no token with a target in the whole batch: the dense term is 0, not NaN
    fields["token_weight"] = np.zeros((B, N), np.float32)
    _, _, out = outputs(rng)
    assert float(passl.build_loss({"name": "TokenLabelCrossEntropy"})(out, to_paddle(fields))["loss_dense"]) == 0.0


def test_equals_soft_target_ce_when_tokens_share_the_cls_target():
    rng = np.random.default_rng(2)
    fields = random_compact(rng)
    fields["token_probs"] = np.repeat(fields["cls_probs"][:, None], N, axis=1)
    fields["token_bg"] = np.repeat(fields["cls_bg"][:, None], N, axis=1)
    cls, aux, out = outputs(rng)
    got = passl.build_loss({"name": "TokenLabelCrossEntropy", "cls_weight": 0.0})(out, to_paddle(fields))
    t_cls = np.stack([dense(fields, b, "cls_probs", "cls_bg") for b in range(B)]) * (1 - S) + S / C
    soft_ce = -(np.repeat(t_cls, N, axis=0) * log_softmax(aux.reshape(B * N, C))).sum(-1).mean()
    assert float(got["loss"]) == pytest.approx(soft_ce, rel=1e-5)
    soft = passl.build_loss({"name": "SoftTargetCrossEntropy"})(TokenLabelOutput(paddle.to_tensor(cls)),
                                                                to_paddle(fields))
    assert float(soft["loss"]) == pytest.approx(-(t_cls * log_softmax(cls)).sum(-1).mean(), rel=1e-5)


def test_mix_weight_is_one_minus_box_area_over_tokens():
    rng = np.random.default_rng(3)
    fields = random_compact(rng)
    cls, aux, out = outputs(rng, [1, 0, 3, 3])               # 2 x 3 box on 6 tokens: lam = 0
    loss_fn = passl.build_loss({"name": "TokenLabelCrossEntropy", "dense_weight": 0.0})
    got = float(loss_fn(out, to_paddle(fields))["loss_cls"])
    t_cls = np.stack([dense(fields, b, "cls_probs", "cls_bg") for b in range(B)]) * (1 - S) + S / C
    # lam = 0: every sample's cls target is entirely its mirror partner's
    assert got == pytest.approx(-(t_cls[::-1] * log_softmax(cls)).sum(-1).mean(), rel=1e-5)
    cls, aux, out = outputs(rng, [0, 0, 1, 2])               # area 2: lam = 2/3
    got = float(loss_fn(out, to_paddle(fields))["loss_cls"])
    mixed = 2 / 3 * t_cls + 1 / 3 * t_cls[::-1]
    assert got == pytest.approx(-(mixed * log_softmax(cls)).sum(-1).mean(), rel=1e-5)


def test_dense_weight_zero_removes_the_dense_term():
    rng = np.random.default_rng(4)
    fields = random_compact(rng)
    cls, aux, out = outputs(rng)
    got = passl.build_loss({"name": "TokenLabelCrossEntropy", "dense_weight": 0.0})(out, to_paddle(fields))
    _, want_cls, _ = reference_loss(cls, aux, fields)
    assert float(got["loss"]) == pytest.approx(want_cls, rel=1e-5)
    got["loss"].backward()
    # aux_logits stays in the graph with an exact zero gradient: under DataParallel its parameters
    # must receive a gradient (see unused_outputs_term)
    assert out.aux_logits.grad is not None and not np.any(out.aux_logits.grad.numpy())


def test_outputs_a_loss_does_not_read_get_a_zero_gradient():
    rng = np.random.default_rng(4)
    fields = random_compact(rng)
    cls, aux, out = outputs(rng)
    got = passl.build_loss({"name": "SoftTargetCrossEntropy"})(out, to_paddle(fields))
    assert float(got["loss"]) == pytest.approx(float(got["loss_cls"]), rel=0, abs=0)
    got["loss"].backward()
    assert out.aux_logits.grad is not None and not np.any(out.aux_logits.grad.numpy())
    assert np.any(out.cls_logits.grad.numpy())


def test_targets_sum_to_one_and_fallback_is_smoothed_one_hot():
    rng = np.random.default_rng(5)
    fields = random_compact(rng)
    target = class_target(to_paddle(fields), C, S).numpy()
    np.testing.assert_allclose(target.sum(-1), 1.0, atol=1e-5)
    label = np.array([3, 0, 10, 7])
    plain = class_target({"label": paddle.to_tensor(label)}, C, S).numpy()
    want = np.full((B, C), S / C)
    want[np.arange(B), label] += 1 - S
    np.testing.assert_allclose(plain, want, atol=1e-6)
    # without compact targets every token gets the smoothed one-hot label too
    cls, aux, out = outputs(rng)
    got = passl.build_loss({"name": "TokenLabelCrossEntropy"})(out, {"label": paddle.to_tensor(label)})
    dense_want = -(want[:, None, :] * log_softmax(aux)).sum(-1).mean()
    assert float(got["loss_dense"]) == pytest.approx(dense_want, rel=1e-5)


def test_ground_truth_blend():
    rng = np.random.default_rng(6)
    fields = random_compact(rng)
    target = (np.stack([dense(fields, b, "cls_probs", "cls_bg") for b in range(B)]) * (1 - S) + S / C)
    fields["label"] = np.array([target[0].argmax(), (target[1].argmax() + 1) % C, target[2].argmax(),
                                (target[3].argmax() + 2) % C])
    truth = np.full((B, C), S / C)
    truth[np.arange(B), fields["label"]] += 1 - S
    ratio = np.array([0.5, 0.9, 0.5, 0.9])[:, None]             # 0.9 - 0.4 * [argmax agrees]
    got = class_target(to_paddle(fields), C, S, ground_truth=True).numpy()
    np.testing.assert_allclose(got, ratio * target + (1 - ratio) * truth, atol=1e-6)


def test_cls_only_output_and_float16_logits():
    rng = np.random.default_rng(7)
    fields = random_compact(rng)
    cls, aux, out = outputs(rng)
    loss_fn = passl.build_loss({"name": "TokenLabelCrossEntropy"})
    only_cls = loss_fn(TokenLabelOutput(out.cls_logits), to_paddle(fields))
    _, want_cls, _ = reference_loss(cls, aux, fields)
    assert float(only_cls["loss"]) == pytest.approx(want_cls, rel=1e-5)
    half = loss_fn(TokenLabelOutput(out.cls_logits.astype("float16"), out.aux_logits.astype("float16")),
                   to_paddle(fields))
    assert float(half["loss"]) == pytest.approx(reference_loss(cls, aux, fields)[0], rel=2e-3)
    assert half["loss"].dtype == paddle.float32


@pytest.mark.parametrize("name", ["TokenLabelCrossEntropy", "SoftTargetCrossEntropy"])
def test_other_outputs_are_refused_with_what_the_model_must_return(name):
    rng = np.random.default_rng(8)
    fields = to_paddle(random_compact(rng))
    _, _, out = outputs(rng)
    loss_fn = passl.build_loss({"name": name})
    for wrong in (tuple(out), out.cls_logits, [out.cls_logits, out.aux_logits]):
        with pytest.raises(ModelOutputError, match="must return TokenLabelOutput") as err:
            loss_fn(wrong, fields)
        assert isinstance(err.value, TypeError)


def test_a_box_without_aux_logits_is_refused():
    """The cls target's mix weight is the box's share of the aux token grid: a box alone cannot be used."""
    rng = np.random.default_rng(9)
    _, _, out = outputs(rng, [1, 0, 3, 3])
    with pytest.raises(ModelOutputError, match="mix_box without aux_logits"):
        passl.build_loss({"name": "TokenLabelCrossEntropy"})(TokenLabelOutput(out.cls_logits, mix_box=out.mix_box),
                                                             to_paddle(random_compact(rng)))
