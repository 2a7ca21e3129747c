"""Full-size variants: exact parameter counts, multiply-adds vs SPEC 1, and key names / shapes equal
to the reference checkpoint layout. Size is the point here, so these build the real models."""

import numpy as np
import pytest

import passl
from passl.models import convert_torch_state_dict, count_macs, count_params
from passl.models.complexity import format_summary, summarize
from lvvit_reference import PUBLISHED, reference_shapes


def _check_variant(name):
    dim, depth, heads, width, skip_lam, params, gmacs, img = PUBLISHED[name]
    model = passl.build_model({"name": name})
    assert model.img_size == (img, img)
    assert count_params(model)["trainable"] == params
    macs = count_macs(model)
    assert abs(macs["total"] / 1e9 - gmacs) / gmacs < 0.02, (macs["total"], gmacs)
    assert macs["grid"] == (img // 16, img // 16)
    # every key and shape of the reference checkpoint, converted, is exactly the model's state dict
    reference = reference_shapes(dim=dim, depth=depth, num_classes=1000, width=width, grid=img // 16)
    converted = convert_torch_state_dict({k: np.broadcast_to(np.float32(0), s) for k, s in reference.items()})
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in converted.items()} == ours
    assert model.blocks[0].skip_lam == skip_lam and model.blocks[0].attn.num_heads == heads


@pytest.mark.parametrize("name", ["lvvit_t", "lvvit_s", "lvvit_m"])
def test_variant_size(name):
    _check_variant(name)


@pytest.mark.slow
def test_lvvit_l_at_448():
    _check_variant("lvvit_l")


def test_macs_of_a_tiny_model_by_hand():
    model = passl.build_model({"name": "LVViT", "img_size": 32, "embed_dim": 8, "depth": 1, "num_heads": 2,
                               "num_classes": 3, "stem": "patch16"})
    # stem 2x2 outputs * 8 ch * 3*16*16; qkv/proj/fc1/fc2 on 5 tokens; 2 attention matmuls; heads
    stem = 4 * 8 * 3 * 256
    linears = 5 * (8 * 24 + 8 * 8 + 8 * 24 + 24 * 8)
    attention = 2 * 5 * 5 * 8
    heads = 8 * 3 + 4 * 8 * 3
    assert count_macs(model)["total"] == stem + linears + attention + heads
    assert count_macs(model, img_size=64)["grid"] == (4, 4)


def test_summary_text():
    text = format_summary(summarize({"name": "LVViT", "img_size": 64, "embed_dim": 32, "depth": 2,
                                     "num_heads": 2, "num_classes": 10}), "tiny")
    assert "4x4 = 16 patch tokens" in text and "trainable" in text and "multiply-adds" in text


def test_summary_tool(tmp_path, capsys):
    from tools.summary import main
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: LVViT, img_size: 64, embed_dim: 32, depth: 2, num_heads: 2, num_classes: 10}\n")
    assert main(["-c", str(cfg), "-o", "model.img_size=96"]) == 0
    assert "6x6 = 36 patch tokens" in capsys.readouterr().out
