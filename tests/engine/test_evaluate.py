"""Top-k hit counting with padding masks; choosing the best of model and EMA."""
import paddle

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


def test_pick_best_prefers_the_better_and_the_ema_on_ties():
    assert pick_best({"model": 40.0}, None, 1) == {"top1": 40.0, "which": "model", "epoch": 1}
    assert pick_best({"model": 40.0, "ema": 45.0}, None, 1) == {"top1": 45.0, "which": "ema", "epoch": 1}
    assert pick_best({"model": 50.0, "ema": 50.0}, None, 2)["which"] == "ema"
    best = {"top1": 50.0, "which": "ema", "epoch": 2}
    assert pick_best({"model": 50.0, "ema": 49.0}, best, 3) is None       # equal is not better
    assert pick_best({"model": 50.5, "ema": 49.0}, best, 3) == {"top1": 50.5, "which": "model", "epoch": 3}
