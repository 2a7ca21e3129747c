"""PASSL v1.1 checkpoints (``epoch_<n>.pd`` / ``latest.pd``) load and convert, giving the reference's
per-sample eval logits.

PASSL's CheckpointHook pickles ``{epoch, state_dict, optimizer, lr_scheduler}`` with the tensors
already numpy arrays; its model is LVViTWrapper, so every weight key starts with ``backbone.``, and
the keys are Paddle's (Linear weights (in, out), BN ``_mean`` / ``_variance``). The files here are
built from the reference key list (SPEC 1) turned into that layout by the rules just stated.

PASSL's own eval forward returns ``cls + 0.5 * aux.max(1)[0]``: in Paddle ``max(1)`` gives the values,
so ``[0]`` picks sample 0's token maximum and adds it to every row (batch-dependent logits). The
same weights here give the reference's ``cls + 0.5 * max over tokens`` of each sample; at batch size 1
the two agree.
"""
import json
import os
import pickle
import sys

import numpy as np
import paddle
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine"))
from engine_helpers import make_image_folder  # noqa: E402
from lvvit_reference import reference_forward, reference_state_dict  # noqa: E402

from passl.models import load_pretrained  # noqa: E402
from passl.models.lvvit import LVViT  # noqa: E402


def passl_state_dict(torch_weights):
    """The reference weights as PASSL's LVViTWrapper.state_dict() holds them, as numpy arrays."""
    out = {}
    for key, value in torch_weights.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.replace(".running_mean", "._mean").replace(".running_var", "._variance")
        out["backbone." + key] = value.T.copy() if key.endswith(".weight") and value.ndim == 2 else value
    return out


def write_passl_checkpoint(path, torch_weights, epoch=300):
    """What PASSL v1.1's CheckpointHook writes: a plain pickle (protocol 3, numpy 1.x module names)."""
    state = {"epoch": epoch, "state_dict": passl_state_dict(torch_weights),
             "optimizer": {"linear_0.w_0_moment1_0": np.zeros((4, 4), np.float32), "linear_0.w_0_beta1_pow_acc_0":
                           np.array([0.9], np.float32), "LR_Scheduler": {"last_epoch": epoch - 1, "last_lr": 1e-5}},
             "lr_scheduler": {"last_epoch": epoch - 1, "last_lr": 1e-5}}
    data = pickle.dumps(state, protocol=3).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _logits(model, images):
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(images)).numpy()


def test_passl_checkpoint_gives_the_reference_per_sample_logits(tmp_path):
    torch_weights = reference_state_dict(np.random.default_rng(0), dim=32, depth=2, num_classes=5, width=64, grid=2)
    path = write_passl_checkpoint(tmp_path / "epoch_300.pd", torch_weights)
    build = lambda: LVViT(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=5, stem="pe4_2")  # noqa: E731
    from_passl, direct = build(), build()
    report = load_pretrained(from_passl, path, log=lambda m: None)
    assert report["which"] == "model" and report["loaded"] == len(from_passl.state_dict())
    load_pretrained(direct, torch_weights, log=lambda m: None)      # the same weights, PyTorch layout
    images = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ours = _logits(from_passl, images)
    np.testing.assert_array_equal(ours, _logits(direct, images))
    np.testing.assert_allclose(ours, reference_forward(torch_weights, images, num_heads=2, skip_lam=1.0),
                               rtol=1e-5, atol=1e-5)
    for i in range(3):   # per sample: a row does not depend on the rest of the batch (PASSL's does)
        np.testing.assert_allclose(_logits(from_passl, images[i:i + 1])[0], ours[i], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_evaluate_and_convert_a_lvvit_tiny_passl_checkpoint(tmp_path, capsys):
    """python tools/train.py -c configs/lvvit/lvvit_tiny.yaml --load epoch_300.pd --evaluate-only, and
    tools/convert_weights.py, on a full-size LV-ViT-T in PASSL's layout."""
    import passl
    from passl.config import load_config
    from passl.io import safetensors_metadata
    from tools.convert_weights import main as convert
    from tools.train import main as train

    torch_weights = reference_state_dict(np.random.default_rng(2), dim=240, depth=12, num_classes=1000, width=64,
                                         grid=14)
    path = write_passl_checkpoint(tmp_path / "epoch_300.pd", torch_weights)
    val = make_image_folder(tmp_path / "val", classes=2, per_class=1, size=64)
    # the weights record no class names: name the 1000 training classes (two of them have val images)
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"class_{c}\n" for c in range(1000)))
    overrides = ["-o", f"data.val.dataset.root={val}", "-o", f"data.val.dataset.class_names={classes}",
                 "-o", "data.val.num_workers=0",
                 "-o", f"output_dir={tmp_path / 'out'}", "-o", "device=cpu"]
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lvvit", "lvvit_tiny.yaml")
    assert train(["-c", config, "--load", path, "--evaluate-only"] + overrides) == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["num_samples"] == 2 and result["which"] == "model" and result["weights"] == os.path.abspath(path)

    dst = str(tmp_path / "lvvit_t.safetensors")
    assert convert(["--src", path, "--dst", dst]) == 0
    assert "detected variant: lvvit_t at 224 px, 1000 classes" in capsys.readouterr().out
    meta = safetensors_metadata(dst)
    assert (meta["variant"], meta["img_size"], meta["num_classes"]) == ("lvvit_t", "224", "1000")

    cfg = load_config(config, [f"data.val.dataset.root={val}"])
    images = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    logits = {}
    for name, source in (("passl", path), ("converted", dst), ("direct", torch_weights)):
        model = passl.build_model(cfg["model"])
        load_pretrained(model, source, log=lambda m: None)
        logits[name] = _logits(model, images)
    np.testing.assert_array_equal(logits["passl"], logits["direct"])
    np.testing.assert_array_equal(logits["converted"], logits["direct"])
