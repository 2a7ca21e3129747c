"""Tiny synthetic ImageFolder data and tiny LV-ViT configs (shared by tests/engine and tests/tools)."""
import os

import numpy as np
import yaml
from PIL import Image


def make_image_folder(root, classes=3, per_class=4, size=32, seed=0):
    """root/class_k/img_i.png: random colour images whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.float32)
            base[..., c % 3] = 160
            pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, f"class_{c}", f"img_{i}.png"))
    return str(root)


# the eval pipeline of the real configs (sizes from model.img_size); on the 32 px test images it changes nothing
EVAL_TRANSFORMS = [{"name": "ResizeShorter", "crop_pct": 1.0}, {"name": "CenterCrop"}, {"name": "Normalize"}]


def tiny_config(tmp_path, train_root, val_root=None, augment=True, **overrides):
    """A config file for a 32 px, 2-block LV-ViT on ``train_root``; returns its path."""
    train_transforms = [{"name": "RandomResizedCrop", "size": 32, "scale": [0.5, 1.0]},
                        {"name": "RandomHorizontalFlip"}, {"name": "Normalize"}] if augment else [{"name": "Normalize"}]
    cfg = {
        "seed": 0, "device": "cpu", "output_dir": str(tmp_path / "out"), "epochs": 2,
        "model": {"name": "LVViT", "img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2,
                  "stem": "patch16", "num_classes": 3, "drop_path_rate": 0.1 if augment else 0.0,
                  "mix_token": augment},
        "loss": {"name": "TokenLabelCrossEntropy"},
        "optimizer": {"name": "AdamW", "lr": 1e-3, "reference_batch": 4},
        "lr_schedule": {"name": "WarmupCosine", "warmup_epochs": 1, "cooldown_epochs": 0, "min_lr": 1e-5},
        "data": {"train": {"dataset": {"name": "ImageFolder", "root": train_root}, "transforms": train_transforms,
                           "batch_size": 4, "num_workers": 0},
                 "val": {"dataset": {"name": "ImageFolder", "root": val_root} if val_root else None,
                         "transforms": EVAL_TRANSFORMS, "batch_size": 4, "num_workers": 0}},
        "ema": {"enable": True, "decay": 0.9},
        "train": {"log_interval": 2},
    }
    for dotted, value in overrides.items():
        node = cfg
        *path, last = dotted.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def child_processes():
    """PIDs of this process's living children (zombies, i.e. exited but not yet reaped, left out), from /proc."""
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                children.add(int(entry))
    return children
