"""Weight conversion and strict loading. Reference checkpoints are fabricated with save_pth from the
key names and shapes of SPEC 1 (tests/models/lvvit_reference.py), never from the model itself."""
import collections

import numpy as np
import paddle
import pytest

from passl.errors import CheckpointError
from passl.models import (convert_torch_state_dict, detect_variant, load_pretrained, resize_pos_embed)
from passl.models.lvvit import LVViT
from passl.io.pth import save_pth
from lvvit_reference import PUBLISHED, reference_forward, reference_shapes, reference_state_dict

SMALL = dict(dim=32, depth=2, num_classes=10, width=16, grid=4)


def small_model(width=16, **overrides):
    """LVViT matching SMALL; the 16-wide stem is pe4_2 with its width changed for speed."""
    cfg = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, num_classes=10, skip_lam=2.0)
    cfg.update(overrides)
    model = LVViT(**cfg)
    if width != 64 and cfg.get("stem", "pe4_2") == "pe4_2":
        from passl.models.lvvit import ConvStem
        model.patch_embed = ConvStem(3, cfg["embed_dim"], 16, width=width)
    return model


@pytest.fixture
def torch_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    weights = reference_state_dict(rng, **SMALL)
    ema = collections.OrderedDict((k, v + 1 if v.dtype == np.float32 else v) for k, v in weights.items())
    path = tmp_path / "lvvit_small.pth.tar"
    save_pth({"epoch": 299, "arch": "lvvit_small", "state_dict": {"module." + k: v for k, v in weights.items()},
              "state_dict_ema": ema}, path)
    return path, weights, ema


def _assert_landed(model, weights):
    """Every reference tensor is in its place: Linear transposed, BN stats renamed, others as is."""
    params = model.state_dict()
    checked = 0
    for key, value in weights.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_mean"):
            got = params[key.replace("running_mean", "_mean")]
        elif key.endswith("running_var"):
            got = params[key.replace("running_var", "_variance")]
        else:
            got = params[key]
        expected = value.T if key.endswith(".weight") and value.ndim == 2 else value
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=key)
        checked += 1
    assert checked == len(params)


def test_converted_checkpoint_loads_strictly_and_matches_reference_forward(torch_checkpoint):
    path, weights, _ = torch_checkpoint
    model = small_model()
    report = load_pretrained(model, path, log=lambda m: None)
    assert report["loaded"] == len(model.state_dict()) and report["pos_embed_resized"] is None
    _assert_landed(model, weights)
    model.eval()
    x = np.random.default_rng(5).standard_normal((2, 3, 64, 64)).astype("float32")
    with paddle.no_grad():
        ours = model(paddle.to_tensor(x)).numpy()
    expected = reference_forward(weights, x, num_heads=2, skip_lam=2.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)  # float32 vs float64: ~5e-7


def test_ema_weights_are_taken_when_asked(torch_checkpoint):
    path, _, ema = torch_checkpoint
    model = small_model()
    load_pretrained(model, path, ema=True, log=lambda m: None)
    _assert_landed(model, ema)


def test_patch16_stem_and_pdparams_round_trip(tmp_path):
    weights = reference_state_dict(np.random.default_rng(1), dim=32, depth=1, num_classes=5, width=None, grid=2)
    model = LVViT(img_size=32, embed_dim=32, depth=1, num_heads=4, num_classes=5, stem="patch16")
    # without BN statistics a dict is taken as Paddle layout: (out, in) Linear weights must not slip in
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_pretrained(model, weights, log=lambda m: None)
    model2 = LVViT(img_size=32, embed_dim=32, depth=1, num_heads=4, num_classes=5, stem="patch16")
    load_pretrained(model2, convert_torch_state_dict(weights), log=lambda m: None)
    _assert_landed(model2, weights)
    paddle.save(model2.state_dict(), str(tmp_path / "m.pdparams"))
    model3 = LVViT(img_size=32, embed_dim=32, depth=1, num_heads=4, num_classes=5, stem="patch16")
    load_pretrained(model3, str(tmp_path / "m.pdparams"), log=lambda m: None)
    _assert_landed(model3, weights)


def test_mismatches_raise_with_every_key_listed(torch_checkpoint):
    _, weights, _ = torch_checkpoint
    broken = dict(weights)
    del broken["blocks.1.mlp.fc2.bias"]
    broken["blocks.7.extra.weight"] = np.zeros(3, np.float32)
    broken["blocks.0.attn.qkv.weight"] = np.zeros((96, 16), np.float32)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(small_model(), broken, log=lambda m: None)
    message = str(err.value)
    for key in ("blocks.1.mlp.fc2.bias", "blocks.7.extra.weight", "blocks.0.attn.qkv.weight"):
        assert key in message
    assert "missing" in message and "unexpected" in message and "shape mismatch" in message


def test_new_num_classes_needs_allow_new_head(torch_checkpoint):
    path, weights, _ = torch_checkpoint
    with pytest.raises(CheckpointError, match="allow_new_head"):
        load_pretrained(small_model(num_classes=7), path, log=lambda m: None)
    model = small_model(num_classes=7)
    logs = []
    report = load_pretrained(model, path, allow_new_head=True, log=logs.append)
    assert sorted(report["reinitialized"]) == sorted(["head.weight", "head.bias", "aux_head.weight", "aux_head.bias"])
    assert any("re-initialised" in m and "7" in m for m in logs)
    assert model.head.weight.shape == [32, 7] and np.all(model.head.bias.numpy() == 0)
    assert 0.005 < model.aux_head.weight.numpy().std() < 0.05
    np.testing.assert_array_equal(model.blocks[1].mlp.fc1.weight.numpy(), weights["blocks.1.mlp.fc1.weight"].T)


def _smooth_pos_embed(grid, dim=8):
    rows, cols = np.meshgrid(np.linspace(0, 1, grid), np.linspace(0, 1, grid), indexing="ij")
    freqs = np.arange(1, dim + 1)[:, None, None] * 0.7
    patches = np.sin(freqs * rows + 0.3 * freqs * cols).reshape(dim, -1).T
    cls = np.full((1, dim), 5.0)
    return np.concatenate([cls, patches])[None].astype("float32")


def test_pos_embed_224_to_384_keeps_cls_and_round_trips():
    original = _smooth_pos_embed(14)
    big = resize_pos_embed(original, 24)
    assert big.shape == (1, 1 + 24 * 24, 8)
    np.testing.assert_array_equal(big[:, 0], original[:, 0])
    back = resize_pos_embed(big, 14)
    assert np.abs(back - original).max() < 0.05 * np.abs(original[:, 1:]).max()
    constant = np.ones((1, 1 + 14 * 14, 4), np.float32)
    np.testing.assert_allclose(resize_pos_embed(constant, (24, 20)), np.ones((1, 1 + 480, 4)), atol=1e-5)
    tensor = resize_pos_embed(paddle.to_tensor(original), 24)
    np.testing.assert_allclose(tensor.numpy(), big, atol=1e-6)


def test_loading_weights_of_another_size_resizes_pos_embed(torch_checkpoint):
    path, weights, _ = torch_checkpoint
    model = small_model(img_size=96)       # 6x6 grid; the file has 4x4
    logs = []
    report = load_pretrained(model, path, log=logs.append)
    assert report["pos_embed_resized"] == ((4, 4), (6, 6))
    assert any("pos_embed" in m and "4x4" in m and "6x6" in m for m in logs)
    pos = model.pos_embed.numpy()
    np.testing.assert_array_equal(pos[:, 0], weights["pos_embed"][:, 0])
    np.testing.assert_allclose(pos[:, 1:], resize_pos_embed(weights["pos_embed"], 6)[:, 1:], atol=1e-6)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_detect_variant_from_reference_shapes(name):
    dim, depth, _, width, _, _, _, img = PUBLISHED[name]
    shapes = reference_shapes(dim=dim, depth=depth, num_classes=1000, width=width, grid=img // 16)
    lazy = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # no memory
    assert detect_variant(lazy) == (name, img)
    assert detect_variant({"module." + k: v for k, v in lazy.items()}) == (name, img)
    shapes = reference_shapes(dim=dim, depth=depth, num_classes=1000, width=width, grid=24)
    assert detect_variant({k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}) == (name, 384)
    assert detect_variant({k: np.broadcast_to(np.float32(0), s) for k, s in reference_shapes(**SMALL).items()}) \
        == (None, 64)


def test_convert_tool(torch_checkpoint, tmp_path, capsys):
    from tools.convert_weights import main
    path, weights, ema = torch_checkpoint
    dst = tmp_path / "out" / "small.pdparams"
    assert main(["--src", str(path), "--dst", str(dst), "--ema", "--img-size", "96"]) == 0
    printed = capsys.readouterr().out
    assert "no published variant" in printed and f"converted {len(convert_torch_state_dict(weights))} tensors" in printed
    model = small_model(img_size=96)
    report = load_pretrained(model, str(dst), log=lambda m: None)
    assert report["pos_embed_resized"] is None   # already resized by --img-size
    np.testing.assert_array_equal(model.blocks[0].attn.qkv.weight.numpy(), ema["blocks.0.attn.qkv.weight"].T)
    with pytest.raises(CheckpointError, match="--force"):
        main(["--src", str(path), "--dst", str(dst)])
    assert main(["--src", str(path), "--dst", str(dst), "--force"]) == 0
    assert sorted(p.name for p in dst.parent.iterdir()) == ["small.pdparams"]  # no temp file left
    raw = tmp_path / "raw.pth"
    save_pth(weights, raw)
    with pytest.raises(CheckpointError, match="EMA"):
        main(["--src", str(raw), "--dst", str(tmp_path / "x.pdparams"), "--ema"])


def test_checkpoint_gives_the_weights_its_best_record_names():
    from passl.models.convert import _find_weights
    model_w, ema_w, bare = np.ones(2, np.float32), np.full(2, 2.0, np.float32), np.full(2, 3.0, np.float32)
    ckpt = {"model": {"w": model_w}, "ema": {"w": ema_w}, "best": {"which": "ema"}}
    state, which = _find_weights(ckpt, False, "ckpt")
    assert which == "ema" and state["w"] is ema_w
    state, which = _find_weights({**ckpt, "best": {"which": "model"}}, False, "ckpt")
    assert which == "model" and state["w"] is model_w
    state, which = _find_weights({"head.weight": bare}, False, "weights")
    assert which == "weights" and state["head.weight"] is bare
