"""Top-k hit counting with padding masks; choosing the best of model and EMA by the configured rule."""
import paddle
import pytest

from passl.engine.evaluate import pick_best, topk_hits


def test_topk_hits_counts_and_mask():
    logits = paddle.to_tensor([
        [0.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0],    # top1 = 1
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0],    # label 6 is last: not in top-5
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5],    # label 2 is 5th: top-5 hit only
        [0.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0],    # padding (masked): would be a hit
    ])
    labels = paddle.to_tensor([1, 6, 2, 1], dtype="int64")
    valid = paddle.to_tensor([True, True, True, False])
    assert topk_hits(logits, labels, valid).numpy().tolist() == [1, 2, 3]
    assert topk_hits(logits, labels).numpy().tolist() == [2, 3, 4]


def test_topk_with_fewer_than_five_classes():
    logits = paddle.to_tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
    labels = paddle.to_tensor([0, 0], dtype="int64")
    assert topk_hits(logits, labels).numpy().tolist() == [1, 2, 2]


def test_pick_best_better_prefers_the_higher_and_the_ema_on_ties():
    def best(top1, so_far, epoch):
        return pick_best(top1, so_far, epoch, rule="better")
    assert best({"model": 40.0}, None, 1) == {"top1": 40.0, "which": "model", "epoch": 1, "rule": "better"}
    assert best({"model": 40.0, "ema": 45.0}, None, 1) == {"top1": 45.0, "which": "ema", "epoch": 1, "rule": "better"}
    assert best({"model": 50.0, "ema": 50.0}, None, 2)["which"] == "ema"
    so_far = {"top1": 50.0, "which": "ema", "epoch": 2, "rule": "better"}
    assert best({"model": 50.0, "ema": 49.0}, so_far, 3) is None       # equal is not better
    assert best({"model": 50.5, "ema": 49.0}, so_far, 3) == {"top1": 50.5, "which": "model", "epoch": 3,
                                                            "rule": "better"}


def test_pick_best_ema_scores_the_ema_alone_as_the_reference_does():
    # the default: a model that scores higher than its EMA is never selected while there is an EMA
    assert pick_best({"model": 60.0, "ema": 45.0}, None, 1) == {"top1": 45.0, "which": "ema", "epoch": 1,
                                                                  "rule": "ema"}
    so_far = {"top1": 45.0, "which": "ema", "epoch": 1, "rule": "ema"}
    assert pick_best({"model": 70.0, "ema": 44.0}, so_far, 2) is None
    assert pick_best({"model": 30.0, "ema": 46.0}, so_far, 3)["epoch"] == 3
    # without an EMA the model is all there is
    assert pick_best({"model": 40.0}, None, 1, rule="ema") == {"top1": 40.0, "which": "model", "epoch": 1,
                                                                 "rule": "ema"}


def test_pick_best_model_ignores_the_ema():
    assert pick_best({"model": 40.0, "ema": 90.0}, None, 1, rule="model") == {
        "top1": 40.0, "which": "model", "epoch": 1, "rule": "model"}
    so_far = {"top1": 40.0, "which": "model", "epoch": 1, "rule": "model"}
    assert pick_best({"model": 39.0, "ema": 95.0}, so_far, 2, rule="model") is None


def test_pick_best_replaces_a_record_kept_by_another_rule():
    # a resumed run whose rule changed: the old record scored other weights, so it cannot be compared
    kept_by_better = {"top1": 80.0, "which": "model", "epoch": 4, "rule": "better"}
    assert pick_best({"model": 70.0, "ema": 60.0}, kept_by_better, 5, rule="ema") == {
        "top1": 60.0, "which": "ema", "epoch": 5, "rule": "ema"}
    # checkpoints written before the rule existed were kept by 'better'
    legacy = {"top1": 80.0, "which": "model", "epoch": 4}
    assert pick_best({"model": 70.0, "ema": 60.0}, legacy, 5, rule="better") is None
    assert pick_best({"model": 70.0, "ema": 60.0}, legacy, 5, rule="model")["epoch"] == 5
    with pytest.raises(ValueError, match="rule must be one of"):
        pick_best({"model": 1.0}, None, 1, rule="best")
