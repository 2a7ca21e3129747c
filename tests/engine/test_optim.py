"""Parameter groups, linear lr scaling, and the stateless lr schedules."""
import math

import numpy as np
import paddle
import pytest

from passl.engine.optim import build_lr_schedule, build_optimizer, epoch_progress, scale_lr, split_decay_groups


class Tiny(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.pos_embed = self.create_parameter([1, 5, 4])
        self.cls_token = self.create_parameter([1, 1, 4])
        self.conv = paddle.nn.Conv2D(3, 4, 3)
        self.norm = paddle.nn.LayerNorm(4)
        self.fc = paddle.nn.Linear(4, 6)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def forward(self, x):
        extra = self.pos_embed.sum() + self.cls_token.sum() + self.conv(paddle.ones([1, 3, 3, 3])).sum()
        return self.fc(self.norm(x + extra))


def test_decay_groups_exclude_1d_biases_and_named():
    model = Tiny()
    decay, no_decay = split_decay_groups(model)
    assert sorted(decay) == ["conv.weight", "fc.weight"]
    assert sorted(no_decay) == sorted(["pos_embed", "cls_token", "conv.bias", "norm.weight", "norm.bias", "fc.bias"])


def test_adamw_decays_only_the_decay_group():
    paddle.seed(0)
    model = Tiny()
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    opt, lr = build_optimizer({"name": "AdamW", "lr": 0.1, "reference_batch": 8, "weight_decay": 0.5},
                              model, global_batch=8, log=None)
    assert lr == pytest.approx(0.1)
    loss = model(paddle.rand([2, 4])).sum() * 0.0   # zero gradients: only weight decay moves weights
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if name in ("conv.weight", "fc.weight"):
            np.testing.assert_allclose(p.numpy(), before[name] * (1 - 0.1 * 0.5), rtol=1e-5)
        else:
            np.testing.assert_array_equal(p.numpy(), before[name])


def test_lr_scales_linearly_with_global_batch():
    assert scale_lr(1.6e-3, 1024, 256) == pytest.approx(4e-4)
    assert scale_lr(1.6e-3, 1024, 2048) == pytest.approx(3.2e-3)
    assert scale_lr(5e-6, 0, 4096) == 5e-6    # 0: no scaling
    _, lr = build_optimizer({"name": "AdamW", "lr": 1e-3, "reference_batch": 1024}, Tiny(), 512, log=None)
    assert lr == pytest.approx(5e-4)


def expected_lr(t, base, warmup_lr, warmup, min_lr, epochs, cooldown):
    """Reference formula in epochs (timm CosineLRScheduler with warm-up, cool-down at min_lr)."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    if t >= epochs - cooldown:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / (epochs - cooldown)))


@pytest.mark.parametrize("per_iteration", [True, False])
def test_warmup_cosine_cooldown_values(per_iteration):
    spe = 4
    cfg = {"name": "WarmupCosine", "warmup_epochs": 2, "warmup_lr": 0.1, "min_lr": 0.01, "cooldown_epochs": 3,
           "per_iteration": per_iteration}
    sched = build_lr_schedule(cfg, base_lr=1.0, epochs=10)
    for step in [0, 1, 3, 4, 6, 8, 9, 13, 20, 27, 28, 30, 39]:
        t = step / spe if per_iteration else step // spe
        progress = epoch_progress(step // spe, step % spe, spe)
        assert sched(progress) == pytest.approx(expected_lr(t, 1.0, 0.1, 2, 0.01, 10, 3)), step
    # a few values written out by hand
    assert sched(0) == pytest.approx(0.1)
    assert sched(1) == pytest.approx(0.55)
    assert sched(7) == pytest.approx(0.01) and sched(9.75) == pytest.approx(0.01)
    if per_iteration:
        assert sched(0.5) == pytest.approx(0.1 + 0.9 * 0.25)
    else:
        assert sched(0.5) == pytest.approx(0.1) and sched(1.75) == pytest.approx(0.55)


def test_the_curve_does_not_depend_on_steps_per_epoch():
    """A run resumed at an epoch boundary with another global batch (other steps per epoch) goes on
    along the same curve: step k of epoch e sits at e + k / steps_per_epoch whatever that is."""
    sched = build_lr_schedule({"name": "WarmupCosine", "warmup_epochs": 2, "min_lr": 0.0, "cooldown_epochs": 0},
                              1.0, 10)
    eight_gpus = [sched(epoch_progress(5, k, 100)) for k in range(0, 100, 25)]
    four_gpus = [sched(epoch_progress(5, k, 200)) for k in range(0, 200, 50)]
    assert four_gpus == eight_gpus
    assert eight_gpus[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_schedule_is_stateless():
    sched = build_lr_schedule({"name": "WarmupCosine"}, 1e-3, 310)
    values = [sched(s / 100) for s in (31000 - 1, 500, 0, 12345)]
    again = build_lr_schedule({"name": "WarmupCosine"}, 1e-3, 310)
    assert [again(s / 100) for s in (31000 - 1, 500, 0, 12345)] == values
    assert values[0] == pytest.approx(1e-5)        # cool-down
    assert values[1] == pytest.approx(expected_lr(5.0, 1e-3, 1e-6, 5, 1e-5, 310, 10))


def test_warmup_prefix_and_constant():
    sched = build_lr_schedule({"name": "WarmupCosine", "warmup_epochs": 2, "warmup_lr": 0.0, "min_lr": 0.0,
                               "cooldown_epochs": 0, "warmup_prefix": True}, 1.0, 6)
    assert sched(2) == pytest.approx(1.0)                # the cosine starts where warm-up ends
    assert sched(4) == pytest.approx(0.5)
    const = build_lr_schedule({"name": "Constant"}, 5e-6, 10)
    assert {const(s / 3) for s in range(30)} == {5e-6}


def test_constant_warms_up_like_the_cosine():
    const = build_lr_schedule({"name": "Constant", "warmup_epochs": 2, "warmup_lr": 0.1}, 1.0, 10)
    assert [const(s / 4) for s in (0, 2, 4, 6, 8, 30)] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0, 1.0])
    whole_epochs = build_lr_schedule({"name": "Constant", "warmup_epochs": 2, "warmup_lr": 0.1,
                                      "per_iteration": False}, 1.0, 10)
    assert [whole_epochs(s / 4) for s in (3, 4, 7, 8)] == pytest.approx([0.1, 0.55, 0.55, 1.0])
