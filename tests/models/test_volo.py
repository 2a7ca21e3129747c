"""VOLO: outlook attention and class attention against numpy versions of the paper's equations, MixToken
(box on the token grid, applied at twice the scale, undone on aux), per-sample eval fusion, conversion of a
checkpoint in the release's key layout, parameter counts of D1-D5, export. Tiny configs (32-64 px).

The numpy reference below is written from the VOLO paper and the release's key names and shapes only
(no passl code); weights are in the release's PyTorch layout (Linear weights (out, in))."""
import collections
import inspect
import math

import numpy as np
import paddle
import pytest

import passl
from passl.errors import ConfigError
from passl.models import detect_variant, load_pretrained
from passl.models.outputs import TokenLabelOutput
from passl.models.volo import VOLO, ClassAttention, ClassBlock, OutlookAttention
from passl.registry import MODELS
from passl.io import save_pth

from model_helpers import small_mix_box_seed

# ---------------------------------------------------------------------------------------------
# numpy reference (float64)


def _linear(x, weights, prefix):
    prefix = prefix.lstrip(".")          # a layer's own keys have no prefix: ".v" -> "v"
    out = x @ weights[prefix + ".weight"].T
    return out + weights[prefix + ".bias"] if prefix + ".bias" in weights else out


def _layer_norm(x, weights, prefix, eps=1e-5):
    prefix = prefix.lstrip(".")
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weights[prefix + ".weight"] + weights[prefix + ".bias"]


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _mlp(x, weights, prefix):
    return _linear(_gelu(_linear(x, weights, prefix + ".fc1")), weights, prefix + ".fc2")


def _conv2d(x, weight, bias, stride, padding):
    """x [B, C, H, W], weight [O, C, k, k] -> [B, O, H', W'] by summing shifted products."""
    size, kernel = x.shape[2], weight.shape[2]
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_size = (size + 2 * padding - kernel) // stride + 1
    out = np.zeros((x.shape[0], weight.shape[0], out_size, out_size))
    for i in range(kernel):
        for j in range(kernel):
            patch = padded[:, :, i:i + stride * out_size:stride, j:j + stride * out_size:stride]
            out += np.einsum("bchw,oc->bohw", patch, weight[:, :, i, j])
    return out if bias is None else out + bias[None, :, None, None]


def outlook_attention_reference(x, weights, prefix, heads, kernel=3, padding=1, stride=2):
    """Outlook attention as the VOLO paper defines it, one window at a time.
    x [B, H, W, C]; keys <prefix>.v / .attn / .proj."""
    batch, height, width, dim = x.shape
    head_dim = dim // heads
    values = _linear(x, weights, prefix + ".v")
    out = np.zeros_like(values)
    for b in range(batch):
        for i in range(math.ceil(height / stride)):
            for j in range(math.ceil(width / stride)):
                # attention weights of this window: a Linear of the centre's average over a stride x stride cell
                centre = x[b, i * stride:(i + 1) * stride, j * stride:(j + 1) * stride].reshape(-1, dim).mean(0)
                logits = _linear(centre, weights, prefix + ".attn").reshape(heads, kernel ** 2, kernel ** 2)
                attention = _softmax(logits * head_dim ** -0.5)
                cells = [(i * stride - padding + m, j * stride - padding + n) for m in range(kernel)
                         for n in range(kernel)]
                inside = [0 <= r < height and 0 <= c < width for r, c in cells]
                window = np.stack([values[b, r, c] if ok else np.zeros(dim) for (r, c), ok in zip(cells, inside)])
                for h in range(heads):
                    part = slice(h * head_dim, (h + 1) * head_dim)
                    mixed = attention[h] @ window[:, part]                      # [k*k, head_dim]
                    for (r, c), ok, row in zip(cells, inside, mixed):
                        if ok:                                                  # fold: sum back onto the map
                            out[b, r, c, part] += row
    return _linear(out, weights, prefix + ".proj")


def self_attention_reference(x, weights, prefix, heads):
    batch, tokens, dim = x.shape
    head_dim = dim // heads
    qkv = _linear(x, weights, prefix + ".qkv").reshape(batch, tokens, 3, heads, head_dim)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    attention = _softmax(q @ k.transpose(0, 1, 3, 2) * head_dim ** -0.5)
    return _linear((attention @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, dim), weights, prefix + ".proj")


def class_attention_reference(x, weights, prefix, heads):
    """CaiT class attention: only x[:, 0] queries. x [B, 1 + N, D] -> [B, 1, D]."""
    batch, tokens, dim = x.shape
    head_dim = dim // heads
    q = _linear(x[:, :1], weights, prefix + ".q").reshape(batch, 1, heads, head_dim).transpose(0, 2, 1, 3)
    kv = _linear(x, weights, prefix + ".kv")
    k = kv[..., :dim].reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3)
    v = kv[..., dim:].reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3)
    attention = _softmax((q * head_dim ** -0.5) @ k.transpose(0, 1, 3, 2))        # [B, heads, 1, T]
    return _linear((attention @ v).transpose(0, 2, 1, 3).reshape(batch, 1, dim), weights, prefix + ".proj")


def volo_reference_forward(weights, images, layers, heads, post_layers=2):
    """Eval-mode VOLO: logits [B, C] = head(cls) + 0.5 * max over tokens of aux_head."""
    x = images.astype(np.float64)
    for conv, bn, stride, padding in ((0, 1, 2, 3), (3, 4, 1, 1), (6, 7, 1, 1)):
        x = _conv2d(x, weights[f"patch_embed.conv.{conv}.weight"], None, stride, padding)
        p = f"patch_embed.conv.{bn}."
        x = (x - weights[p + "running_mean"][:, None, None]) / np.sqrt(weights[p + "running_var"][:, None, None] + 1e-5)
        x = np.maximum(x * weights[p + "weight"][:, None, None] + weights[p + "bias"][:, None, None], 0.0)
    proj = weights["patch_embed.proj.weight"]
    x = _conv2d(x, proj, weights["patch_embed.proj.bias"], proj.shape[-1], 0).transpose(0, 2, 3, 1)
    for i in range(layers[0]):
        p = f"network.0.{i}"
        x = x + outlook_attention_reference(_layer_norm(x, weights, p + ".norm1"), weights, p + ".attn", heads[0])
        x = x + _mlp(_layer_norm(x, weights, p + ".norm2"), weights, p + ".mlp")
    x = _conv2d(x.transpose(0, 3, 1, 2), weights["network.1.proj.weight"], weights["network.1.proj.bias"], 2, 0)
    x = x.transpose(0, 2, 3, 1) + weights["pos_embed"]
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    for stage in range(1, len(layers)):
        for i in range(layers[stage]):
            p = f"network.{stage + 1}.{i}"
            x = x + self_attention_reference(_layer_norm(x, weights, p + ".norm1"), weights, p + ".attn", heads[stage])
            x = x + _mlp(_layer_norm(x, weights, p + ".norm2"), weights, p + ".mlp")
    x = np.concatenate([np.broadcast_to(weights["cls_token"], (x.shape[0], 1, x.shape[-1])), x], axis=1)
    for i in range(post_layers):
        p = f"post_network.{i}"
        cls = x[:, :1] + class_attention_reference(_layer_norm(x, weights, p + ".norm1"), weights, p + ".attn",
                                                   heads[-1])
        cls = cls + _mlp(_layer_norm(cls, weights, p + ".norm2"), weights, p + ".mlp")
        x = np.concatenate([cls, x[:, 1:]], axis=1)
    x = _layer_norm(x, weights, "norm")
    return _linear(x[:, 0], weights, "head") + 0.5 * _linear(x[:, 1:], weights, "aux_head").max(1)


def release_shapes(layers, dims, heads, mlp_ratio, stem, grid, num_classes, post_layers=2, kernel=3):
    """Key -> shape of a checkpoint written by the release's models/volo.py (PyTorch layout)."""
    shapes = collections.OrderedDict()
    shapes["pos_embed"] = (1, grid, grid, dims[-1])
    shapes["cls_token"] = (1, 1, dims[-1])
    for conv, bn, cin in ((0, 1, 3), (3, 4, stem), (6, 7, stem)):
        shapes[f"patch_embed.conv.{conv}.weight"] = (stem, cin, 7, 7) if conv == 0 else (stem, stem, 3, 3)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"patch_embed.conv.{bn}.{name}"] = (stem,)
        shapes[f"patch_embed.conv.{bn}.num_batches_tracked"] = ()
    shapes["patch_embed.proj.weight"] = (dims[0], stem, 4, 4)
    shapes["patch_embed.proj.bias"] = (dims[0],)

    def norm_mlp(p, dim):
        hidden = int(dim * mlp_ratio)
        for norm in ("norm1", "norm2"):
            shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = (dim,)
        shapes[f"{p}.mlp.fc1.weight"], shapes[f"{p}.mlp.fc1.bias"] = (hidden, dim), (hidden,)
        shapes[f"{p}.mlp.fc2.weight"], shapes[f"{p}.mlp.fc2.bias"] = (dim, hidden), (dim,)

    for i in range(layers[0]):
        p = f"network.0.{i}"
        norm_mlp(p, dims[0])
        shapes[f"{p}.attn.v.weight"] = (dims[0], dims[0])
        shapes[f"{p}.attn.attn.weight"] = (kernel ** 4 * heads[0], dims[0])
        shapes[f"{p}.attn.attn.bias"] = (kernel ** 4 * heads[0],)
        shapes[f"{p}.attn.proj.weight"], shapes[f"{p}.attn.proj.bias"] = (dims[0], dims[0]), (dims[0],)
    shapes["network.1.proj.weight"], shapes["network.1.proj.bias"] = (dims[1], dims[0], 2, 2), (dims[1],)
    for stage in range(1, len(layers)):
        for i in range(layers[stage]):
            p = f"network.{stage + 1}.{i}"
            norm_mlp(p, dims[stage])
            shapes[f"{p}.attn.qkv.weight"] = (3 * dims[stage], dims[stage])
            shapes[f"{p}.attn.proj.weight"], shapes[f"{p}.attn.proj.bias"] = (dims[stage],) * 2, (dims[stage],)
    for i in range(post_layers):
        p = f"post_network.{i}"
        norm_mlp(p, dims[-1])
        shapes[f"{p}.attn.kv.weight"] = (2 * dims[-1], dims[-1])
        shapes[f"{p}.attn.q.weight"] = (dims[-1], dims[-1])
        shapes[f"{p}.attn.proj.weight"], shapes[f"{p}.attn.proj.bias"] = (dims[-1], dims[-1]), (dims[-1],)
    shapes["aux_head.weight"], shapes["aux_head.bias"] = (num_classes, dims[-1]), (num_classes,)
    shapes["norm.weight"] = shapes["norm.bias"] = (dims[-1],)
    shapes["head.weight"], shapes["head.bias"] = (num_classes, dims[-1]), (num_classes,)
    return shapes


def release_state_dict(rng, **kwargs):
    out = collections.OrderedDict()
    for key, shape in release_shapes(**kwargs).items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(7, np.int64)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "conv.1.weight", "conv.4.weight",
                           "conv.7.weight")):          # LayerNorm and BatchNorm scales near 1
            out[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 4
            out[key] = (rng.standard_normal(shape) / np.sqrt(fan_in) * (0.3 if key.endswith("bias") else 1.0)
                        ).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# layers against the reference

TINY = dict(layers=(1, 1, 1, 0), embed_dims=(16, 32, 32, 32), num_heads=(2, 4, 4, 4), stem_hidden_dim=8,
            num_classes=5)


def tiny(img_size=32, **overrides):
    paddle.seed(0)
    return VOLO(img_size=img_size, **{**TINY, **overrides})


def _torch_layout(layer):
    """A layer's parameters as a release-layout dict (Linear weights transposed to (out, in)), float64."""
    return {k: (v.numpy().T if k.endswith("weight") and v.ndim == 2 else v.numpy()).astype(np.float64)
            for k, v in layer.state_dict().items()}


def _randomise(layer, rng, scale=0.3):
    for param in layer.parameters():
        param.set_value(paddle.to_tensor((rng.standard_normal(param.shape) * scale).astype("float32")))


@pytest.mark.parametrize("size", [(6, 6), (5, 7)], ids=["even", "odd"])
def test_outlook_attention_matches_the_paper_equations(size):
    rng = np.random.default_rng(0)
    layer = OutlookAttention(dim=8, num_heads=2, kernel_size=3, padding=1, stride=2, qkv_bias=True)
    _randomise(layer, rng)
    x = rng.standard_normal((2, *size, 8)).astype("float32")
    with paddle.no_grad():
        ours = layer(paddle.to_tensor(x)).numpy()
    expected = outlook_attention_reference(x.astype(np.float64), _torch_layout(layer), "", heads=2)
    assert ours.shape == x.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_class_attention_matches_the_equations_and_leaves_patch_tokens_alone():
    rng = np.random.default_rng(1)
    attention = ClassAttention(dim=12, num_heads=3)
    _randomise(attention, rng)
    x = rng.standard_normal((2, 5, 12)).astype("float32")
    with paddle.no_grad():
        ours = attention(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(ours, class_attention_reference(x.astype(np.float64), _torch_layout(attention), "", 3),
                               rtol=1e-4, atol=1e-5)
    block = ClassBlock(dim=12, num_heads=3)
    _randomise(block, rng)
    with paddle.no_grad():
        out = block(paddle.to_tensor(x)).numpy()
    np.testing.assert_array_equal(out[:, 1:], x[:, 1:])
    weights = _torch_layout(block)
    cls = x[:, :1] + class_attention_reference(_layer_norm(x.astype(np.float64), weights, "norm1"), weights, "attn", 3)
    cls = cls + _mlp(_layer_norm(cls, weights, "norm2"), weights, "mlp")
    np.testing.assert_allclose(out[:, :1], cls, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# forward semantics

def images(batch=4, size=32, seed=1):
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype("float32"))


def test_eval_output_of_a_sample_is_its_own_cls_plus_half_max_aux():
    model = tiny()
    model.eval()
    x = images(4)
    with paddle.no_grad():
        together = model(x).numpy()
        alone = np.concatenate([model(x[i:i + 1]).numpy() for i in range(4)])
        feats = model.forward_features(x).numpy()
    np.testing.assert_allclose(alone, together, rtol=0, atol=1e-5)
    head, aux = model.head, model.aux_head
    expected = feats[:, 0] @ head.weight.numpy() + head.bias.numpy() \
        + 0.5 * (feats[:, 1:] @ aux.weight.numpy() + aux.bias.numpy()).max(axis=1)
    np.testing.assert_allclose(together, expected, rtol=1e-5, atol=1e-5)


def _mixed_and_plain(model, x, seed):
    paddle.seed(seed)
    mixed = model(x)
    model.mix_token = False
    plain = model(x)
    model.mix_token = True
    return mixed, plain


def test_mixtoken_box_is_on_the_token_grid_applied_at_twice_the_scale_and_undone_on_aux():
    model = tiny(img_size=64)                   # stem map 8 x 8, token grid 4 x 4
    model.train()
    x = images(4, size=64)
    # no token mixing (outlook and self-attention outputs zeroed): a token's output depends on its own
    # 2 x 2 cell of the stem map only; then, once undone, aux must equal the unmixed run exactly, which it
    # does only if the stem map was mixed on whole cells of the box scaled by 2 and aux un-mixed on the grid
    for name, param in model.named_parameters():
        if name.startswith("network.") and ".attn.proj." in name:
            param.set_value(paddle.zeros_like(param))
    seen = 0
    for seed in range(12):
        mixed, plain = _mixed_and_plain(model, x, seed)
        box = mixed.mix_box.numpy()
        assert isinstance(mixed, TokenLabelOutput) and mixed.mix_box.dtype == paddle.int64
        assert 0 <= box[0] <= box[2] <= 4 and 0 <= box[1] <= box[3] <= 4
        area = (box[2] - box[0]) * (box[3] - box[1])
        assert plain.mix_box is None
        np.testing.assert_allclose(mixed.aux_logits.numpy(), plain.aux_logits.numpy(), rtol=1e-5, atol=1e-5)
        if 0 < area < 16:
            seen += 1       # the class token attends over the mixed tokens: its logits do change
            assert np.abs(mixed.cls_logits.numpy() - plain.cls_logits.numpy()).max() > 1e-4
    assert seen >= 3


def test_mixtoken_partner_is_the_reversed_batch():
    """Same box, batch reversed: sample i's partner is B-1-i, so the outputs are the first run's, reversed
    (another pairing, e.g. a roll, breaks this). Together with the test above: the mix happens, on whole
    cells of the scaled box, with the reversed batch, and is undone on aux."""
    model = tiny(img_size=64)
    model.train()
    x = images(4, size=64)
    seed = small_mix_box_seed(model, x)
    paddle.seed(seed)
    first = model(x)
    paddle.seed(seed)
    second = model(paddle.flip(x, [0]))
    np.testing.assert_array_equal(first.mix_box.numpy(), second.mix_box.numpy())
    np.testing.assert_allclose(first.cls_logits.numpy(), second.cls_logits.numpy()[::-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first.aux_logits.numpy(), second.aux_logits.numpy()[::-1], rtol=1e-4, atol=1e-5)


def test_mixtoken_draws_come_from_paddle_only():
    model = tiny(img_size=64, drop_path_rate=0.2)
    model.train()
    x = images(4, size=64)
    runs = []
    for numpy_seed in (1, 2):
        np.random.seed(numpy_seed)
        paddle.seed(123)
        out = model(x)
        runs.append([t.numpy() for t in out])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_outputs_without_dense_head_or_mix():
    model = tiny(return_dense=False)
    model.train()
    out = model(images(2))
    assert isinstance(out, TokenLabelOutput) and out.aux_logits is None and out.mix_box is None
    assert out.cls_logits.shape == [2, 5]
    model.eval()
    with paddle.no_grad():
        evaluated = model(images(2))
        feats = model.forward_features(images(2))
    np.testing.assert_allclose(evaluated.numpy(), model.head(feats[:, 0]).numpy(), rtol=1e-5, atol=1e-6)


def test_geometry_attributes_and_size_errors():
    model = tiny(img_size=64)
    assert model.img_size == (64, 64) and model.grid_size == (4, 4) and model.num_tokens == 16
    assert model.num_classes == 5 and model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert tuple(model.pos_embed.shape) == (1, 4, 4, 32)
    with pytest.raises(ConfigError, match="divisible by 16"):
        tiny(img_size=40)
    with pytest.raises(ConfigError, match="img_size"):
        model(images(1, size=32))
    with pytest.raises(ConfigError, match="embed_dims"):
        tiny(embed_dims=(16, 32, 48, 32))


def test_reset_heads():
    model = tiny()
    model.head.bias.set_value(paddle.ones_like(model.head.bias))
    model.reset_heads()
    assert np.all(model.head.bias.numpy() == 0) and np.all(model.aux_head.bias.numpy() == 0)
    assert 0.005 < model.aux_head.weight.numpy().std() < 0.05


def test_drop_path_rises_over_the_transformer_blocks_only():
    model = VOLO(img_size=32, layers=(2, 1, 2, 1), embed_dims=(8, 16, 16, 16), num_heads=(1, 2, 2, 2),
                 stem_hidden_dim=4, num_classes=3, drop_path_rate=0.5)
    rates = [block.drop_path.p for stage in model.network[2:] for block in stage]
    np.testing.assert_allclose(rates, [0.5 * j / 5 for j in (2, 3, 4, 5)])
    assert all(block.drop_path.p == 0 for block in model.network[0])
    assert all(block.drop_path.p == 0 for block in model.post_network)


# ---------------------------------------------------------------------------------------------
# conversion and the published variants

RELEASE_TINY = dict(layers=(1, 1, 1, 0), dims=(16, 32, 32, 32), heads=(2, 4, 4, 4), mlp_ratio=3.0, stem=8,
                    num_classes=5)


def test_release_checkpoint_converts_loads_and_matches_the_reference_forward(tmp_path, capsys):
    from tools.convert_weights import main as convert_main
    weights = release_state_dict(np.random.default_rng(0), grid=2, **RELEASE_TINY)
    src = tmp_path / "d_tiny_224.pth.tar"
    save_pth({"epoch": 9, "state_dict": {"module." + k: v for k, v in weights.items()},
              "state_dict_ema": {k: v + 1 if v.dtype == np.float32 else v for k, v in weights.items()}}, src)
    dst = tmp_path / "tiny.pdparams"
    assert convert_main(["--src", str(src), "--dst", str(dst)]) == 0
    assert "no published variant" in capsys.readouterr().out
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype("float32")
    expected = volo_reference_forward({k: v.astype(np.float64) for k, v in weights.items()}, x,
                                      RELEASE_TINY["layers"], RELEASE_TINY["heads"])
    for source in (str(dst), str(src)):          # the converted file, and the .pth.tar read directly
        model = tiny()
        report = load_pretrained(model, source, log=lambda m: None)
        assert report["loaded"] == len(model.state_dict())
        model.eval()
        with paddle.no_grad():
            ours = model(paddle.to_tensor(x)).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_loading_at_another_size_resizes_the_grid_pos_embed(tmp_path):
    weights = release_state_dict(np.random.default_rng(0), grid=2, **RELEASE_TINY)
    # [1, rows, cols, D] varying along rows only, channel d scaled by d + 1: a resize that swaps rows and
    # columns or mixes channels shows
    rows = np.arange(2, dtype=np.float32)[None, :, None, None]
    weights["pos_embed"] = np.broadcast_to(rows * (np.arange(32, dtype=np.float32) + 1), (1, 2, 2, 32)).copy()
    save_pth({"state_dict": weights}, tmp_path / "w.pth")
    model = tiny(img_size=64)          # 4 x 4 token grid; the file's is 2 x 2
    logs = []
    report = load_pretrained(model, str(tmp_path / "w.pth"), log=logs.append)
    assert report["pos_embed_resized"] == ((2, 2), (4, 4)) and any("2x2" in m and "4x4" in m for m in logs)
    resized = model.pos_embed.numpy()[0] / (np.arange(32) + 1)           # [4, 4, 32], one profile f(row)
    profile = resized[:, 0, 0]
    np.testing.assert_allclose(resized, np.broadcast_to(profile[:, None, None], resized.shape), atol=1e-5)
    assert np.all(np.diff(profile) >= -1e-6) and profile[0] < 0.1 and profile[-1] > 0.9


PUBLISHED = {  # from the release's models/volo.py: layers, embed_dims, heads, mlp ratio, stem width, params
    "volo_d1": ((4, 4, 8, 2), (192, 384, 384, 384), (6, 12, 12, 12), 3.0, 64, 26_632_040),
    "volo_d2": ((6, 4, 10, 4), (256, 512, 512, 512), (8, 16, 16, 16), 3.0, 64, 58_678_336),
    "volo_d3": ((8, 8, 16, 4), (256, 512, 512, 512), (8, 16, 16, 16), 3.0, 64, 86_325_072),
    "volo_d4": ((8, 8, 16, 4), (384, 768, 768, 768), (12, 16, 16, 16), 3.0, 64, 192_961_520),
    "volo_d5": ((12, 12, 20, 4), (384, 768, 768, 768), (12, 16, 16, 16), 4.0, 128, 295_455_584),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_and_variant_detection(name):
    layers, dims, heads, ratio, stem, params = PUBLISHED[name]
    with paddle.LazyGuard():                     # shapes only: no memory, no initialisation
        model = passl.build_model({"name": name})
    assert sum(int(p.size) for p in model.parameters() if p.trainable) == params
    shapes = release_shapes(layers, dims, heads, ratio, stem, grid=14, num_classes=1000)
    lazy = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    assert detect_variant(lazy) == (name, 224)
    assert {k.replace("running_mean", "_mean").replace("running_var", "_variance") for k in shapes
            if not k.endswith("num_batches_tracked")} == set(model.state_dict())
    shapes["pos_embed"] = (1, 24, 24, dims[-1])
    assert detect_variant({"module." + k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}) \
        == (name, 384)


def test_multiply_adds_of_a_tiny_volo_by_hand():
    from passl.models.complexity import format_summary, summarize
    summary = summarize({"name": "VOLO", "img_size": 32, **TINY})
    macs = summary["macs"]
    stem = 16 * 16 * 8 * 3 * 49 + 2 * 16 * 16 * 8 * 8 * 9 + 4 * 4 * 16 * 8 * 4 * 4      # 32 px -> 16 -> 4 x 4
    outlooker = 16 * 16 * 16 * 2 + 16 * 16 * 48 * 2 + 4 * 16 * 162 + 4 * 81 * 16     # v, proj, mlp; attn on 4 cells
    downsample = 4 * 32 * 16 * 4
    transformer = 2 * (4 * 32 * 96 + 4 * 32 * 32 + 4 * 32 * 96 * 2 + 2 * 4 * 4 * 32)     # layers (1, 1, 1, 0): 2 blocks
    post = 2 * (5 * 32 * 64 + 32 * 32 + 32 * 32 + 32 * 96 * 2 + 2 * 5 * 32)
    heads = 32 * 5 * (1 + 4)
    assert macs["stem"] == stem and macs["heads"] == heads
    assert macs["attention"] == 4 * 81 * 16 + 2 * 2 * 4 * 4 * 32 + 2 * 2 * 5 * 32
    assert macs["total"] == stem + outlooker + downsample + transformer + post + heads
    assert macs["grid"] == (2, 2) and summary["depth"] == 5
    assert "4 patch tokens" in format_summary(summary)


def test_registered_variants_show_their_defaults():
    signature = inspect.signature(MODELS.get("volo_d3"))
    assert signature.parameters["layers"].default == (8, 8, 16, 4)
    assert signature.parameters["drop_path_rate"].default == 0.5
    assert set(inspect.signature(VOLO).parameters) == set(signature.parameters)
    model = passl.build_model({"name": "VOLO", "img_size": 32, **{k: list(v) if isinstance(v, tuple) else v
                                                                    for k, v in TINY.items()}})
    assert isinstance(model, VOLO) and model.grid_size == (2, 2)


# ---------------------------------------------------------------------------------------------
# a tiny VOLO through the whole toolkit: training with token labels, exact resume, export, predict, annotate

TINY_CONFIG = {"name": "VOLO", "img_size": 32, "layers": [1, 1, 1, 0], "embed_dims": [16, 32, 32, 32],
               "num_heads": [2, 4, 4, 4], "stem_hidden_dim": 8, "num_classes": 3, "drop_path_rate": 0.1}


def _write_label_maps(image_root, label_root, grid=4, k=2):
    """[2, k, grid, grid] float16 maps per image: its own class on the left half, the next class on the right."""
    import os
    for class_dir in sorted(os.listdir(image_root)):
        label = int(class_dir.split("_")[1])
        os.makedirs(os.path.join(label_root, class_dir), exist_ok=True)
        for name in os.listdir(os.path.join(image_root, class_dir)):
            scores = np.zeros((k, grid, grid), np.float16)
            classes = np.zeros((k, grid, grid), np.float16)
            scores[0], scores[1] = 4.0, 1.0
            classes[0, :, :grid // 2], classes[0, :, grid // 2:] = label, (label + 1) % 3
            classes[1] = (label + 2) % 3
            stem = os.path.splitext(name)[0]
            np.save(os.path.join(label_root, class_dir, stem + ".npy"), np.stack([scores, classes]))


@pytest.fixture
def token_label_run(tmp_path):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine"))
    from engine_helpers import make_image_folder, tiny_config
    train_root = make_image_folder(tmp_path / "train", per_class=4)
    val_root = make_image_folder(tmp_path / "val", per_class=2, seed=1)
    _write_label_maps(train_root, str(tmp_path / "labels"))

    def config(run_dir):
        run_dir.mkdir()
        return tiny_config(run_dir, train_root, val_root, model=dict(TINY_CONFIG),
                           loss={"name": "TokenLabelCrossEntropy", "dense_weight": 0.5},
                           data__train__label_store={"name": "npy", "root": str(tmp_path / "labels"),
                                                     "coverage": "full"})
    return config, val_root


@pytest.mark.slow
def test_tiny_volo_trains_with_token_labels_resumes_exactly_and_exports(token_label_run, monkeypatch, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    from passl.config import load_config
    from passl.engine.checkpoint import load_file
    from passl.engine import train
    from passl.engine.step import OptimizerStep
    config, val_root = token_label_run
    from passl.losses.token_label import TokenLabelCrossEntropy
    seen = []
    loss_forward = TokenLabelCrossEntropy.forward

    def recording_forward(self, outputs, batch):   # what the loss receives: model output and dense targets
        seen.append((type(outputs).__name__, tuple(outputs.aux_logits.shape), outputs.mix_box is not None,
                     tuple(batch["token_probs"].shape[:2]) if "token_probs" in batch else None))
        return loss_forward(self, outputs, batch)

    straight = config(tmp_path / "a")
    with monkeypatch.context() as patch:
        patch.setattr(TokenLabelCrossEntropy, "forward", recording_forward)
        assert train(load_config(straight)) == 0
    # 6 steps of 4 images; token targets pooled from the label maps on the model's 2 x 2 grid
    assert seen == [("TokenLabelOutput", (4, 4, 3), True, (4, 4))] * 6
    expected = load_file(str(tmp_path / "a" / "out" / "latest.pdckpt"))
    log = (tmp_path / "a" / "out" / "train.log").read_text()
    assert "loss_dense" in log and "done: 2 epochs" in log
    metrics = [json.loads(line) for line in (tmp_path / "a" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all(0 <= m["val_top1"] <= 100 for m in metrics)

    original, steps = OptimizerStep.step, [0]

    def step_then_interrupt(self, lr):
        original(self, lr)
        steps[0] += 1
        if steps[0] == 4:   # mid-epoch (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    interrupted = config(tmp_path / "b")
    with monkeypatch.context() as patch:
        patch.setattr(OptimizerStep, "step", step_then_interrupt)
        assert train(load_config(interrupted)) == 130
    assert train(load_config(interrupted), resume="auto") == 0
    resumed = load_file(str(tmp_path / "b" / "out" / "latest.pdckpt"))
    for part in ("model", "ema"):
        assert expected[part].keys() == resumed[part].keys()
        for key in expected[part]:
            np.testing.assert_array_equal(expected[part][key].numpy(), resumed[part][key].numpy(), err_msg=key)
    assert resumed["global_step"] == expected["global_step"] == 6

    # export the trained weights and predict with them
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    out = tmp_path / "export"
    weights = tmp_path / "b" / "out" / "best_model.pdparams"
    done = subprocess.run([sys.executable, os.path.join(root, "tools", "export_model.py"), "-c",
                           str(tmp_path / "b" / "out" / "config.yaml"), "--load", str(weights), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert done.returncode == 0, done.stderr
    image = os.path.join(val_root, "class_1", "img_0.png")
    done = subprocess.run([sys.executable, os.path.join(root, "tools", "predict.py"), "--model", str(out), image],
                          capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert done.returncode == 0, done.stderr
    assert image in done.stdout and "1. class_" in done.stdout and "predicted 1 image(s)" in done.stderr
    from passl.export import load_exported
    predictor, info = load_exported(str(out), device="cpu")
    assert json.loads((out / "preprocess.json").read_text())["model"]["name"] == "VOLO"
    model = passl.build_model(TINY_CONFIG)
    load_pretrained(model, str(weights), log=lambda m: None)
    model.eval()
    x = images(3, size=32, seed=7)
    with paddle.no_grad():
        np.testing.assert_allclose(predictor(x.numpy()), model(x).numpy(), rtol=0, atol=1e-5)


def test_volo_annotates_with_its_aux_head(tmp_path):
    """tools/generate_labels.py with a VOLO config: the maps are the top-k of aux_head on every token."""
    import os

    import yaml
    from PIL import Image

    from tools.generate_labels import main as generate
    rng = np.random.default_rng(0)
    for i in range(3):
        os.makedirs(tmp_path / "images" / f"c{i}")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"c{i}" / "a.png")
    paddle.seed(4)
    model = passl.build_model(TINY_CONFIG)
    paddle.save(model.state_dict(), str(tmp_path / "v.pdparams"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": TINY_CONFIG}))
    assert generate(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "labels"), "-c",
                     str(tmp_path / "cfg.yaml"), "--weights", str(tmp_path / "v.pdparams"), "--topk", "2",
                     "--no-progress", "--device", "cpu"]) == 0
    model.eval()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for i in range(3):
        pixels = np.asarray(Image.open(tmp_path / "images" / f"c{i}" / "a.png"), np.float64) / 255.0  # 32 px: as is
        x = paddle.to_tensor(((pixels - mean) / std).transpose(2, 0, 1)[None].astype("float32"))
        with paddle.no_grad():
            tokens = model.forward_features(x).numpy()[0, 1:]                                   # [N, D]
        aux = tokens @ model.aux_head.weight.numpy() + model.aux_head.bias.numpy()              # [N, C]
        aux = aux.T.reshape(3, 2, 2)                                                            # [C, h, w]
        order = np.argsort(-aux, axis=0, kind="stable")[:2]
        maps = np.load(tmp_path / "labels" / f"c{i}" / "a.npy")
        assert maps.shape == (2, 2, 2, 2)
        np.testing.assert_array_equal(maps[1], order.astype(np.float16))
        np.testing.assert_allclose(maps[0].astype(np.float32), np.take_along_axis(aux, order, 0), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# the shipped configs carry the release's recipe (values written out here by hand from its README / main.py)

def _config(name):
    import os

    from passl.config import load_config
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return load_config(os.path.join(root, "configs", "volo", name))


@pytest.mark.parametrize("name,model,lr,drop_path", [("volo_d1.yaml", "volo_d1", 1.6e-3, 0.1),
                                                     ("volo_d2.yaml", "volo_d2", 1.0e-3, 0.2),
                                                     ("volo_d3.yaml", "volo_d3", 1.0e-3, 0.5),
                                                     ("volo_d4.yaml", "volo_d4", 1.0e-3, 0.5),
                                                     ("volo_d5.yaml", "volo_d5", 8.0e-4, 0.75)])
def test_pretraining_configs(name, model, lr, drop_path):
    cfg = _config(name)
    assert (cfg["model"]["name"], cfg["model"]["img_size"], cfg["model"]["drop_path_rate"]) == (model, 224, drop_path)
    opt, sched, loss = cfg["optimizer"], cfg["lr_schedule"], cfg["loss"]
    assert (opt["lr"], opt["reference_batch"], opt["weight_decay"], cfg["data"]["train"]["batch_size"]) == \
        (lr, 1024, 0.05, 128)
    assert cfg["epochs"] == 310 and (sched["name"], sched["warmup_epochs"], sched["min_lr"], sched["cooldown_epochs"]) \
        == ("WarmupCosine", 20, 1e-5, 10)
    assert (loss["cls_weight"], loss["dense_weight"], loss["ground_truth"]) == (1.0, 0.5, False)
    assert cfg["ema"]["enable"] is False
    assert cfg["data"]["train"]["label_store"]["name"] == "npy"
    assert cfg["data"]["val"]["transforms"][0]["crop_pct"] == 0.96


@pytest.mark.parametrize("name,model,size,batch,drop_path,crop_pct", [
    ("volo_d1_384.yaml", "volo_d1", 384, 64, 0.1, 1.0), ("volo_d2_384.yaml", "volo_d2", 384, 48, 0.2, 1.0),
    ("volo_d3_448.yaml", "volo_d3", 448, 30, 0.5, 1.0), ("volo_d4_448.yaml", "volo_d4", 448, 24, 0.5, 1.15),
    ("volo_d5_448.yaml", "volo_d5", 448, 16, 0.75, 1.15), ("volo_d5_512.yaml", "volo_d5", 512, 12, 0.75, 1.15)])
def test_finetuning_configs(name, model, size, batch, drop_path, crop_pct):
    cfg = _config(name)
    assert (cfg["model"]["name"], cfg["model"]["img_size"], cfg["model"]["drop_path_rate"]) == (model, size, drop_path)
    opt, sched = cfg["optimizer"], cfg["lr_schedule"]
    assert (opt["lr"], opt["reference_batch"], opt["weight_decay"]) == (8e-6, 8 * batch, 1e-8)
    assert (sched["warmup_epochs"], sched["min_lr"], sched["cooldown_epochs"], cfg["epochs"]) == (5, 4e-6, 10, 40)
    assert cfg["loss"]["ground_truth"] is True and cfg["loss"]["dense_weight"] == 0.5
    assert cfg["data"]["train"]["batch_size"] == batch
    sizes = [t["size"] for t in cfg["data"]["train"]["transforms"] + cfg["data"]["val"]["transforms"] if "size" in t]
    assert set(sizes) == {size} and cfg["data"]["val"]["transforms"][0]["crop_pct"] == crop_pct
    with paddle.LazyGuard():
        built = passl.build_model(cfg["model"])
    assert built.grid_size == (size // 16, size // 16)       # the token-label grid: 24 / 28 / 32
