"""LV-ViT forward semantics: eval per sample, MixToken (reproducible, inside the grid, undone on aux),
dense maps, dynamic-batch export, size checks. Tiny configs: dim 32, depth 2, 64 px."""
import numpy as np
import paddle
import pytest

import passl
from passl.errors import ConfigError
from passl.models.lvvit import LVViT, box_mask, draw_mix_box, mix_tokens
from passl.models.outputs import TokenLabelOutput
from lvvit_reference import reference_box_area_mean

TINY = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def tiny(**overrides):
    paddle.seed(0)
    return LVViT(**{**TINY, **overrides})


def images(batch=4, size=64, seed=1):
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype("float32"))


def test_eval_output_of_a_sample_does_not_depend_on_its_batch():
    model = tiny()
    model.eval()
    x = images(4)
    with paddle.no_grad():
        together = model(x).numpy()
        for i in range(4):
            alone = model(x[i:i + 1]).numpy()
            np.testing.assert_allclose(alone[0], together[i], rtol=0, atol=1e-6)


def test_eval_output_is_cls_plus_half_max_of_aux():
    model = tiny()
    model.eval()
    x = images(3)
    with paddle.no_grad():
        feats = model.forward_features(x).numpy()
        out = model(x).numpy()
    w, b = model.head.weight.numpy(), model.head.bias.numpy()
    aw, ab = model.aux_head.weight.numpy(), model.aux_head.bias.numpy()
    expected = feats[:, 0] @ w + b + 0.5 * (feats[:, 1:] @ aw + ab).max(axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_mixtoken_same_seed_same_outputs_and_independent_of_numpy_rng():
    model = tiny(drop_path_rate=0.2)
    model.train()
    x = images(4)
    runs = []
    for numpy_seed in (1, 2):
        np.random.seed(numpy_seed)  # must not matter: randomness comes from paddle only
        paddle.seed(123)
        cls, aux, box = model(x)
        runs.append((cls.numpy(), aux.numpy(), box.numpy()))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    boxes = set()
    for seed in range(12):
        paddle.seed(seed)
        boxes.add(tuple(model(x)[2].numpy().tolist()))
    assert len(boxes) > 3, "the box should change with the seed"


def test_box_contract_over_many_draws():
    grid_h, grid_w = 5, 7
    paddle.seed(0)
    draws = np.stack([draw_mix_box(grid_h, grid_w).numpy() for _ in range(3000)])
    assert draws.dtype == np.int64 and draws.shape == (3000, 4)
    r1, c1, r2, c2 = draws.T
    assert (0 <= r1).all() and (r1 <= r2).all() and (r2 <= grid_h).all()
    assert (0 <= c1).all() and (c1 <= c2).all() and (c2 <= grid_w).all()
    area = (r2 - r1) * (c2 - c1)
    assert (area == 0).any() and (area >= grid_h * grid_w // 2).any()
    # same distribution as the reference rand_bbox (simulated independently with numpy)
    expected = reference_box_area_mean(grid_h, grid_w, 200_000)
    assert abs(area.mean() / (grid_h * grid_w) - expected) < 0.03


def test_box_mask_marks_exactly_the_box():
    box = paddle.to_tensor([1, 2, 3, 5], dtype="int64")
    mask = box_mask(box, 4, 6).numpy()
    expected = np.zeros((4, 6), bool)
    expected[1:3, 2:5] = True
    np.testing.assert_array_equal(mask, expected)


def _manual_mixed_forward(model, x, box):
    """Mix the stem output by hand with python slicing, then run the rest of the model."""
    r1, c1, r2, c2 = box.tolist()
    grid = model.embed(x).numpy()
    mixed = grid.copy()
    mixed[:, :, r1:r2, c1:c2] = grid[::-1, :, r1:r2, c1:c2]
    tokens = model.tokens(paddle.to_tensor(mixed))
    for block in model.blocks:
        tokens = block(tokens)
    tokens = model.norm(tokens)
    return model.head(tokens[:, 0]).numpy(), model.aux_head(tokens[:, 1:]).numpy()


def test_mixtoken_takes_reversed_batch_inside_box_and_undoes_it_on_aux():
    model = tiny(depth=1)
    model.train()
    x = images(4)
    for seed in range(40):
        paddle.seed(seed)
        cls, aux, box = model(x)
        r1, c1, r2, c2 = box.numpy().tolist()
        if (r2 - r1) * (c2 - c1) > 0:
            break
    else:
        pytest.fail("no non-empty box in 40 draws")
    manual_cls, manual_aux = _manual_mixed_forward(model, x, box.numpy())
    np.testing.assert_allclose(cls.numpy(), manual_cls, rtol=1e-5, atol=1e-5)
    gh, gw = model.grid_size
    manual_aux = manual_aux.reshape(4, gh, gw, -1)
    manual_aux[:, r1:r2, c1:c2] = manual_aux[::-1, r1:r2, c1:c2].copy()  # the undo step, by hand
    np.testing.assert_allclose(aux.numpy().reshape(4, gh, gw, -1), manual_aux, rtol=1e-5, atol=1e-5)


def test_after_undo_aux_row_is_that_images_own_output_when_tokens_do_not_interact():
    """depth 0: each token's aux output depends on that token only, so after the undo step the
    mixed forward must reproduce the un-mixed aux of every image, inside the box too."""
    model = tiny(depth=0)
    model.train()
    x = images(4)
    model.mix_token = False
    _, plain_aux, box = model(x)
    assert box is None
    model.mix_token = True
    mixed_any = False
    for seed in range(10):
        paddle.seed(seed)
        cls, aux, box = model(x)
        r1, c1, r2, c2 = box.numpy().tolist()
        mixed_any |= (r2 - r1) * (c2 - c1) > 0
        np.testing.assert_allclose(aux.numpy(), plain_aux.numpy(), rtol=1e-6, atol=1e-6)
    assert mixed_any


def test_outputs_without_dense_or_mix():
    x = images(2)
    model = tiny(return_dense=False)
    model.train()
    out = model(x)
    assert isinstance(out, TokenLabelOutput) and out.cls_logits.shape == [2, 10]
    assert out.aux_logits is None and out.mix_box is None        # class token only: no MixToken
    model.eval()
    assert isinstance(model(x), paddle.Tensor) and model(x).shape == [2, 10]
    model = tiny(mix_token=False)
    model.train()
    cls, aux, box = model(x)
    assert box is None and cls.shape == [2, 10] and aux.shape == [2, 16, 10]


def test_training_output_is_a_token_label_output_and_eval_output_logits():
    model = tiny()
    model.train()
    out = model(images(2))
    assert isinstance(out, TokenLabelOutput)
    assert out.cls_logits.shape == [2, 10] and out.aux_logits.shape == [2, 16, 10]
    assert out.mix_box.dtype == paddle.int64 and out.mix_box.shape == [4]
    model.eval()
    with paddle.no_grad():
        assert isinstance(model(images(2)), paddle.Tensor)


def test_forward_reads_as_features_then_heads():
    model = tiny()
    model.eval()
    x = images(3)
    with paddle.no_grad():
        features = model.forward_features(x)
        cls, aux = model.forward_head(features)
        out = model(x)
    assert features.shape == [3, 17, 32] and cls.shape == [3, 10] and aux.shape == [3, 16, 10]
    np.testing.assert_allclose(out.numpy(), (cls + 0.5 * aux.max(axis=1)).numpy(), rtol=1e-6, atol=1e-6)
    model = tiny(return_dense=False)
    model.eval()
    with paddle.no_grad():
        assert model.forward_head(model.forward_features(x))[1] is None


def test_mix_tokens_swaps_batch_rows_inside_the_mask_and_undoes_itself():
    x = paddle.arange(4 * 2 * 3, dtype="float32").reshape([4, 2, 3])
    mask = paddle.to_tensor([[False, True, False], [False, True, True]])
    mixed = mix_tokens(x, mask).numpy()
    want = x.numpy().copy()
    want[:, mask.numpy()] = x.numpy()[::-1][:, mask.numpy()]
    np.testing.assert_array_equal(mixed, want)
    np.testing.assert_array_equal(mix_tokens(paddle.to_tensor(mixed), mask).numpy(), x.numpy())


def test_dense_maps_are_patch_tokens_in_row_major_grid():
    model = tiny()
    model.eval()
    x = images(2)
    with paddle.no_grad():
        first, last = model.forward_dense_maps(x, [0, -1], apply_norm=True)
        feats = model.forward_features(x).numpy()
    assert first.shape == [2, 32, 4, 4] and last.shape == [2, 32, 4, 4]
    last = last.numpy()
    for r, c in [(0, 0), (1, 3), (3, 2)]:
        np.testing.assert_allclose(last[:, :, r, c], feats[:, 1 + r * 4 + c], rtol=1e-5, atol=1e-6)


def test_dynamic_batch_to_static_matches_eager(tmp_path):
    model = tiny()
    model.eval()
    x = images(4)
    with paddle.no_grad():
        eager = model(x).numpy()
    static = paddle.jit.to_static(model, input_spec=[paddle.static.InputSpec([None, 3, 64, 64], "float32")],
                                  full_graph=True)
    np.testing.assert_allclose(static(x).numpy(), eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(static(x[:3]).numpy(), eager[:3], rtol=1e-5, atol=1e-5)


def test_image_size_checks():
    with pytest.raises(ConfigError, match="divisible by patch_size"):
        LVViT(**{**TINY, "img_size": 72})
    with pytest.raises(ConfigError, match="stem"):
        LVViT(**{**TINY, "stem": "pe9"})
    model = tiny()
    with pytest.raises(ConfigError, match="img_size"):
        model(images(1, size=96))
    rect = LVViT(**{**TINY, "img_size": (48, 80), "stem": "patch16"})
    assert rect.grid_size == (3, 5) and rect.num_tokens == 15
    rect.eval()
    assert rect(paddle.zeros([2, 3, 48, 80])).shape == [2, 10]


def test_attributes_and_no_weight_decay():
    model = tiny()
    assert model.grid_size == (4, 4) and model.num_tokens == 16 and model.num_classes == 10
    assert model.patch_size == 16
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() == {"pos_embed", "cls_token"} and model.no_weight_decay() <= names


def test_init_follows_the_reference():
    model = tiny(embed_dim=64, num_classes=50)
    w = model.blocks[0].mlp.fc1.weight.numpy()
    assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
    assert np.all(model.head.bias.numpy() == 0) and np.all(model.norm.weight.numpy() == 1)
    assert abs(model.pos_embed.numpy().std() - 0.02) < 0.003
    conv = model.patch_embed.conv2.weight.numpy()  # PyTorch default: U(+-1/sqrt(fan_in))
    bound = 1 / np.sqrt(64 * 9)
    assert np.abs(conv).max() <= bound and np.abs(conv).max() > 0.9 * bound


def test_factories_build_from_config_dicts():
    model = passl.build_model({"name": "lvvit_t", "img_size": 96, "num_classes": 7, "drop_path_rate": 0.2})
    assert model.grid_size == (6, 6) and model.num_classes == 7
    rates = [b.drop_path.p for b in model.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.2, 12))
    assert model.blocks[0].skip_lam == 1.0
    with pytest.raises(ConfigError, match="img_sizee"):
        passl.build_model({"name": "lvvit_t", "img_sizee": 96})
    tiny_cfg = passl.build_model({"name": "LVViT", **TINY, "stem": "patch16"})
    assert tiny_cfg.num_tokens == 16


def test_variant_signature_shows_its_defaults_and_not_its_architecture():
    import inspect
    params = inspect.signature(passl.MODELS.get("lvvit_m")).parameters
    assert params["drop_path_rate"].default == 0.2 and params["img_size"].default == 224
    assert inspect.signature(passl.MODELS.get("lvvit_l")).parameters["img_size"].default == 448
    assert {"num_classes", "in_chans", "drop_rate", "attn_drop_rate", "mix_token", "return_dense",
            "aux_weight"} <= set(params)
    assert not {"embed_dim", "depth", "num_heads", "stem", "skip_lam", "patch_size"} & set(params)
    with pytest.raises(TypeError, match="depth"):
        passl.MODELS.get("lvvit_t")(depth=2)


def test_variants_are_rows_of_data_and_carry_their_eval_preprocessing():
    from passl.models.lvvit import VARIANTS
    assert set(VARIANTS) == {"lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l"}
    assert VARIANTS["lvvit_s"].arch == dict(embed_dim=384, depth=16, num_heads=6, stem="pe4_2", skip_lam=2.0)
    assert VARIANTS["lvvit_m"].eval_cfg(224)["crop_pct"] == 1.0 and VARIANTS["lvvit_s"].eval_cfg(384)["crop_pct"] == 1.0
    tiny_224 = passl.build_model({"name": "lvvit_t", "num_classes": 3})
    assert len(tiny_224.blocks) == 12 and tiny_224.embed_dim == 240 and tiny_224.blocks[0].attn.num_heads == 4
    assert tiny_224.eval_cfg == dict(crop_pct=0.9, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                                     std=(0.229, 0.224, 0.225))
    assert passl.build_model({"name": "lvvit_t", "img_size": 384, "num_classes": 3}).eval_cfg["crop_pct"] == 1.0


def test_reset_heads_reinitialises_both_heads():
    model = tiny()
    for layer in (model.head, model.aux_head):
        layer.bias.set_value(paddle.ones_like(layer.bias))
    before = model.head.weight.numpy().copy()
    model.reset_heads()
    assert not np.any(model.head.bias.numpy()) and not np.any(model.aux_head.bias.numpy())
    assert not np.allclose(model.head.weight.numpy(), before)
    assert abs(model.head.weight.numpy().std() - 0.02) < 0.01


def test_config_keys_of_a_variant_are_its_signature(tmp_path):
    from passl.config import load_config
    path = tmp_path / "v.yaml"
    path.write_text("model: {name: lvvit_s, img_size: 384}\n")
    cfg = load_config(str(path), ["model.drop_path_rate=0", "model.num_classes=10"])
    assert cfg["model"] == {"name": "lvvit_s", "img_size": 384, "drop_path_rate": 0.0, "num_classes": 10}
    with pytest.raises(ConfigError) as err:
        load_config(str(path), ["model.depth=2"])           # the architecture comes with the name
    assert "unknown key 'model.depth'" in str(err.value) and "drop_path_rate" in str(err.value)
    with pytest.raises(ConfigError, match="Did you mean: drop_path_rate"):
        load_config(str(path), ["model.drop_pth_rate=0.1"])
    cfg = load_config(str(path), ["model.name=LVViT", "model.depth=2"])   # LVViT takes every keyword
    assert cfg["model"]["depth"] == 2
