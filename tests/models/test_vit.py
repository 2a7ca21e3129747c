"""Plain ViT / DeiT: conversion of a checkpoint in timm's key layout (zero aux_head, so the converted model's
eval output is the original's), a numpy forward written from the ViT equations (LayerNorm eps 1e-6, qkv bias),
MixToken and per-sample eval, parameter counts and variant detection. Tiny configs (dim 32, 32 px)."""
import collections
import math

import numpy as np
import paddle
import pytest

import passl
from passl.errors import CheckpointError
from passl.losses.token_label import TokenLabelCrossEntropy
from passl.models import detect_variant, load_pretrained
from passl.models.outputs import TokenLabelOutput
from passl.models.vit import VisionTransformer
from passl.io import save_pth

from model_helpers import small_mix_box_seed


def timm_shapes(dim, depth, num_classes, grid, patch=16, mlp_ratio=4):
    """Key -> shape of timm's VisionTransformer (DeiT) state dict, PyTorch layout; no aux_head."""
    shapes = collections.OrderedDict()
    shapes["cls_token"] = (1, 1, dim)
    shapes["pos_embed"] = (1, 1 + grid * grid, dim)
    shapes["patch_embed.proj.weight"], shapes["patch_embed.proj.bias"] = (dim, 3, patch, patch), (dim,)
    for i in range(depth):
        p = f"blocks.{i}."
        shapes[p + "norm1.weight"] = shapes[p + "norm1.bias"] = (dim,)
        shapes[p + "attn.qkv.weight"], shapes[p + "attn.qkv.bias"] = (3 * dim, dim), (3 * dim,)
        shapes[p + "attn.proj.weight"], shapes[p + "attn.proj.bias"] = (dim, dim), (dim,)
        shapes[p + "norm2.weight"] = shapes[p + "norm2.bias"] = (dim,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (mlp_ratio * dim, dim), (mlp_ratio * dim,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (dim, mlp_ratio * dim), (dim,)
    shapes["norm.weight"] = shapes["norm.bias"] = (dim,)
    shapes["head.weight"], shapes["head.bias"] = (num_classes, dim), (num_classes,)
    return shapes


def _layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def vit_reference_logits(w, images, heads, patch=16):
    """Eval-mode ViT from the equations: patchify, cls + pos_embed, pre-norm blocks, norm, head(cls)."""
    b, _, size, _ = images.shape
    grid = size // patch
    patches = images.reshape(b, 3, grid, patch, grid, patch).transpose(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, -1)
    x = patches @ w["patch_embed.proj.weight"].reshape(w["patch_embed.proj.weight"].shape[0], -1).T \
        + w["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(w["cls_token"], (b, 1, x.shape[-1])), x], 1) + w["pos_embed"]
    dim = x.shape[-1]
    head_dim = dim // heads
    depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = _layer_norm(x, w[p + "norm1.weight"], w[p + "norm1.bias"])
        qkv = (h @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]).reshape(b, -1, 3, heads, head_dim)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        attn = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)) @ v
        x = x + attn.transpose(0, 2, 1, 3).reshape(b, -1, dim) @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = _layer_norm(x, w[p + "norm2.weight"], w[p + "norm2.bias"])
        h = h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"]
        h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
        x = x + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
    x = _layer_norm(x, w["norm.weight"], w["norm.bias"])
    return x[:, 0] @ w["head.weight"].T + w["head.bias"]


def timm_state_dict(rng, dim=32, depth=2, num_classes=5, grid=2):
    out = collections.OrderedDict()
    for key, shape in timm_shapes(dim, depth, num_classes, grid).items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            out[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 4
            out[key] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
    # tokens of variance ~1e-6 entering the first LayerNorm: its eps (1e-6 in DeiT, not 1e-5) shows in the output
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token"):
        out[key] *= 1e-3
    return out


def tiny(**overrides):
    paddle.seed(0)
    return VisionTransformer(**{**dict(img_size=32, embed_dim=32, depth=2, num_heads=4, num_classes=5), **overrides})


def test_timm_checkpoint_converts_with_a_zero_aux_head_and_matches_the_reference(tmp_path, capsys):
    from tools.convert_weights import main as convert_main
    weights = timm_state_dict(np.random.default_rng(0))
    src = tmp_path / "deit_tiny_patch16_224-a1311bcf.pth"
    save_pth({"model": weights}, src)
    dst = tmp_path / "vit.pdparams"
    assert convert_main(["--src", str(src), "--dst", str(dst)]) == 0
    assert "no published variant" in capsys.readouterr().out
    # timm's .safetensors files hold the PyTorch tensors as they are (attn.proj is square: a missed
    # transpose would load without a shape error); ours record the Paddle layout in their metadata
    from safetensors.numpy import save_file
    timm_safetensors = tmp_path / "model.safetensors"
    save_file(dict(weights), str(timm_safetensors), metadata={"format": "pt"})
    ours_safetensors = tmp_path / "vit.safetensors"
    assert convert_main(["--src", str(timm_safetensors), "--dst", str(ours_safetensors)]) == 0
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype("float32")
    expected = vit_reference_logits({k: v.astype(np.float64) for k, v in weights.items()}, x.astype(np.float64), 4)
    for source in (str(dst), str(src), str(timm_safetensors), str(ours_safetensors)):
        model = tiny()
        logs = []
        report = load_pretrained(model, source, log=logs.append)
        assert report["loaded"] == len(model.state_dict())
        assert any("aux_head" in m and "zero" in m for m in logs)
        assert not model.aux_head.weight.numpy().any() and not model.aux_head.bias.numpy().any()
        model.eval()
        with paddle.no_grad():
            ours = model(paddle.to_tensor(x)).numpy()      # cls + 0.5 * max(aux), aux = 0: the DeiT output
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    eps_1e5 = tiny(norm_eps=1e-5)
    load_pretrained(eps_1e5, str(dst), log=lambda m: None)
    eps_1e5.eval()
    with paddle.no_grad():
        assert np.abs(eps_1e5(paddle.to_tensor(x)).numpy() - expected).max() > 1e-2   # the test sees the eps


def test_a_checkpoint_with_aux_head_loads_as_is(tmp_path):
    model = tiny()
    model.aux_head.bias.set_value(paddle.full_like(model.aux_head.bias, 0.5))
    paddle.save(model.state_dict(), str(tmp_path / "own.pdparams"))
    other = tiny()
    logs = []
    load_pretrained(other, str(tmp_path / "own.pdparams"), log=logs.append)
    np.testing.assert_array_equal(other.aux_head.bias.numpy(), np.full(5, 0.5, np.float32))
    assert not any("aux_head" in m for m in logs)


def test_eval_is_per_sample_and_mixtoken_is_undone_on_aux():
    model = tiny(img_size=64)                       # 4 x 4 token grid
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((4, 3, 64, 64)).astype("float32"))
    with paddle.no_grad():
        together = model(x).numpy()
        alone = np.concatenate([model(x[i:i + 1]).numpy() for i in range(4)])
    np.testing.assert_allclose(alone, together, rtol=0, atol=1e-5)
    model.train()
    for block in model.blocks:                     # tokens do not interact: a token's output is its own
        block.attn.proj.weight.set_value(paddle.zeros_like(block.attn.proj.weight))
        block.attn.proj.bias.set_value(paddle.zeros_like(block.attn.proj.bias))
    seen = 0
    for seed in range(12):
        paddle.seed(seed)
        mixed = model(x)
        model.mix_token = False
        plain = model(x)
        model.mix_token = True
        assert isinstance(mixed, TokenLabelOutput) and plain.mix_box is None
        np.testing.assert_allclose(mixed.aux_logits.numpy(), plain.aux_logits.numpy(), rtol=1e-5, atol=1e-5)
        box = mixed.mix_box.numpy()
        if 0 < (box[2] - box[0]) * (box[3] - box[1]) < 16:
            seen += 1
            # the cls token sees the mixed tokens only through attention, which is off here: it is unchanged
            np.testing.assert_allclose(mixed.cls_logits.numpy(), plain.cls_logits.numpy(), rtol=1e-5, atol=1e-5)
    assert seen >= 3


def test_mixed_tokens_come_from_the_reversed_batch():
    model = tiny(img_size=64, drop_path_rate=0.0)
    model.train()
    x = paddle.to_tensor(np.random.default_rng(3).standard_normal((4, 3, 64, 64)).astype("float32"))
    seed = small_mix_box_seed(model, x)
    paddle.seed(seed)
    first = model(x)
    paddle.seed(seed)
    second = model(paddle.flip(x, [0]))
    np.testing.assert_allclose(first.cls_logits.numpy(), second.cls_logits.numpy()[::-1], rtol=1e-4, atol=1e-5)
    paddle.seed(seed)
    model.mix_token = False
    unmixed = model(x)
    assert np.abs(first.cls_logits.numpy() - unmixed.cls_logits.numpy()).max() > 1e-4


def test_trains_against_token_targets():
    model = tiny()
    model.train()
    out = model(paddle.randn([2, 3, 32, 32]))
    losses = TokenLabelCrossEntropy()(out, {"label": paddle.to_tensor([1, 3])})
    losses["loss"].backward()
    assert float(losses["loss_dense"]) > 0
    assert model.aux_head.weight.grad is not None and model.patch_embed.proj.weight.grad is not None


TIMM_PARAMS = {"deit_tiny": (192, 5_717_416), "deit_small": (384, 22_050_664), "deit_base": (768, 86_567_656)}


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_parameter_counts_and_variant_detection(name):
    dim, timm_params = TIMM_PARAMS[name]          # timm.create_model('<name>_patch16_224'), counted with torch
    with paddle.LazyGuard():
        model = passl.build_model({"name": name})
    assert sum(int(p.size) for p in model.parameters()) == timm_params + dim * 1000 + 1000   # + aux_head
    shapes = timm_shapes(dim, 12, 1000, 14)
    assert detect_variant({k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}) == (name, 224)
    shapes["pos_embed"] = (1, 1 + 24 * 24, dim)
    assert detect_variant({"module." + k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}) == (name, 384)
    assert set(shapes) | {"aux_head.weight", "aux_head.bias"} == set(model.state_dict())


def test_distilled_deit_is_refused_by_name():
    shapes = timm_shapes(192, 12, 1000, 14)
    shapes["dist_token"], shapes["pos_embed"] = (1, 1, 192), (1, 198, 192)
    with pytest.raises(CheckpointError, match="distilled"):
        detect_variant({k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()})
