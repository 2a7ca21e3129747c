"""The shipped configs carry the published recipe (SPEC 6); values written out here by hand."""
import os

import pytest

from passl.config import load_config
from passl.data.pipeline import build_transforms

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "lvvit")

PRETRAIN = {  # file: (model, drop_path, lr per 1024, val crop_pct)
    "lvvit_tiny.yaml": ("lvvit_t", 0.1, 1.6e-3, 0.9),
    "lvvit_small.yaml": ("lvvit_s", 0.1, 1.6e-3, 0.9),
    "lvvit_medium.yaml": ("lvvit_m", 0.2, 1.6e-3, 1.0),
    "lvvit_large.yaml": ("lvvit_l", 0.3, 1.0e-3, 1.0),
}


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_pretraining_recipe(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    model, drop_path, lr, crop_pct = PRETRAIN[name]
    assert cfg["model"]["name"] == model and cfg["model"]["drop_path_rate"] == drop_path
    assert cfg["model"]["img_size"] == 224
    opt, sched = cfg["optimizer"], cfg["lr_schedule"]
    assert (opt["name"], opt["lr"], opt["reference_batch"], opt["weight_decay"]) == ("AdamW", lr, 1024, 0.05)
    assert (opt["beta1"], opt["beta2"], opt["epsilon"]) == (0.9, 0.999, 1e-8)
    assert cfg["epochs"] == 310
    assert (sched["name"], sched["warmup_epochs"], sched["warmup_lr"], sched["min_lr"], sched["cooldown_epochs"]) == \
        ("WarmupCosine", 5, 1e-6, 1e-5, 10)
    assert cfg["ema"] == {"enable": True, "decay": 0.99992}
    assert cfg["amp"]["enable"] == "auto"
    assert cfg["data"]["train"]["batch_size"] == 128
    assert cfg["data"]["val"]["transforms"][0]["crop_pct"] == crop_pct
    ops = "rand-n3-m9-mstd0.5-inc1" if model == "lvvit_l" else "rand-m9-mstd0.5-inc1"
    assert any(t.get("config_str") == ops for t in cfg["data"]["train"]["transforms"])


# the reference's README fine-tuning command (-b 64 x 8, --lr 5e-6 --min-lr 5e-6 --weight-decay 1e-8
# --drop-path 0.1, no --model-ema) with main.py's defaults for the rest (5 warm-up epochs from 1e-6);
# evaluation at the variant's default crop_pct (lvvit_s 0.9, M and L 1.0) at every size
@pytest.mark.parametrize("name,model,size,crop_pct", [("lvvit_small_384.yaml", "lvvit_s", 384, 0.9),
                                                      ("lvvit_medium_384.yaml", "lvvit_m", 384, 1.0),
                                                      ("lvvit_medium_448.yaml", "lvvit_m", 448, 1.0),
                                                      ("lvvit_large_448.yaml", "lvvit_l", 448, 1.0)])
def test_finetune_recipe(name, model, size, crop_pct):
    cfg = load_config(os.path.join(CONFIGS, name))
    assert (cfg["model"]["name"], cfg["model"]["img_size"], cfg["model"]["drop_path_rate"]) == (model, size, 0.1)
    opt, sched = cfg["optimizer"], cfg["lr_schedule"]
    assert (opt["lr"], opt["reference_batch"], opt["weight_decay"]) == (5e-6, 512, 1e-8)
    assert (sched["name"], sched["warmup_epochs"], sched["warmup_lr"]) == ("Constant", 5, 1e-6)
    assert cfg["ema"]["enable"] is False
    assert cfg["data"]["train"]["batch_size"] == 64
    # the crops and resizes take the model's img_size: RandomResizedCrop, ResizeShorter, CenterCrop
    built = {split: build_transforms(cfg["data"][split]["transforms"], cfg["model"]["img_size"])
             for split in ("train", "val")}
    sizes = [t.size for t in built["train"] + built["val"] if hasattr(t, "size")]
    assert len(sizes) == 3 and set(sizes) == {size}
    assert cfg["data"]["val"]["transforms"][0]["crop_pct"] == crop_pct
    assert built["val"][0].target_short_side() == int(size / crop_pct)


def test_transfer_config():
    cfg = load_config(os.path.join(CONFIGS, "transfer_example.yaml"))
    assert cfg["loss"]["dense_weight"] == 0
    assert cfg["model"]["num_classes"] != 1000 and cfg["train"]["reinit_head"] is True
    assert cfg["data"]["train"]["label_store"] is None
