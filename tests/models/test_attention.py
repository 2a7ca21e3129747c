"""Attention calls Paddle's scaled_dot_product_attention without ``scale`` (the default 1/sqrt(head_dim)),
so that Paddle's selector may pick flash attention; the numbers on the CPU are those of an explicit scale."""
import dataclasses

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from passl.models.layers import Attention
from passl.models.volo import ClassAttention


def _sdpa():
    """Paddle's kernel selection module (paddle/nn/functional/sdpa.py; Paddle 3.0 has none)."""
    return pytest.importorskip("paddle.nn.functional.sdpa", reason="this Paddle has no sdpa kernel selector")


def _record_selection(monkeypatch):
    """Wrap Paddle's backend selector: returns the list of (SDPParams, chosen backend) it saw."""
    sdpa = _sdpa()
    seen = []
    select = sdpa.select_sdp_for_sdpa

    def recording(param):
        choice = select(param)
        seen.append((param, choice))
        return choice

    monkeypatch.setattr(sdpa, "select_sdp_for_sdpa", recording)
    return seen


@pytest.mark.parametrize("dim,heads", [(240, 4), (128, 2)])   # head_dim 60 (LV-ViT-T) and 64 (S/M/L)
def test_attention_equals_explicit_default_scale(dim, heads):
    paddle.seed(0)
    layer = Attention(dim, heads, qkv_bias=True)
    layer.eval()
    x = paddle.randn([2, 17, dim])
    q, k, v = layer.qkv(x).reshape([0, 0, 3, heads, dim // heads]).unbind(2)
    out = layer(x)
    if _takes_scale():   # the numbers of the explicit scale, bit for bit
        explicit = F.scaled_dot_product_attention(q, k, v, training=False, scale=(dim // heads) ** -0.5)
        np.testing.assert_array_equal(out.numpy(), layer.proj(explicit.reshape([0, 0, dim])).numpy())
    # and that is attention as written in the paper
    qt, kt, vt = (t.numpy().transpose(0, 2, 1, 3).astype(np.float64) for t in (q, k, v))
    scores = qt @ kt.transpose(0, 1, 3, 2) / np.sqrt(dim // heads)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    paper = paddle.to_tensor((weights @ vt).transpose(0, 2, 1, 3).astype(np.float32))
    np.testing.assert_allclose(out.numpy(), layer.proj(paper.reshape([0, 0, dim])).numpy(), rtol=1e-4, atol=1e-5)


def _takes_scale():
    import inspect
    return "scale" in inspect.signature(F.scaled_dot_product_attention).parameters


def test_class_attention_equals_explicit_default_scale():
    paddle.seed(1)
    layer = ClassAttention(64, 2)
    layer.eval()
    x = paddle.randn([2, 10, 64])
    keys, values = layer.kv(x).reshape([0, 0, 2, 2, 32]).unbind(2)
    query = layer.q(x[:, :1]).reshape([0, 1, 2, 32])
    if not _takes_scale():
        pytest.skip("this Paddle's scaled_dot_product_attention takes no scale")
    explicit = F.scaled_dot_product_attention(query, keys, values, training=False, scale=32 ** -0.5)
    np.testing.assert_array_equal(layer(x).numpy(), layer.proj(explicit.reshape([0, 1, 64])).numpy())


def test_no_explicit_scale_reaches_paddle(monkeypatch):
    seen = _record_selection(monkeypatch)
    Attention(64, 1)(paddle.randn([1, 5, 64]))
    ClassAttention(64, 2)(paddle.randn([1, 5, 64]))
    assert len(seen) == 2
    assert all(param.scale is None for param, _ in seen)
    assert all(choice == "math" for _, choice in seen)   # the CPU


def _flash_allowed(param, dtype, monkeypatch):
    """Would Paddle 3.3.1's selector take flash attention for ``param`` in ``dtype`` on a capable GPU?"""
    sdpa = _sdpa()
    monkeypatch.setattr(sdpa, "check_all_tensors_on_device", lambda p: True)
    monkeypatch.setattr(sdpa, "check_flash_attention_hardware_support", lambda device_id: True)
    if not sdpa._config:
        sdpa.init_config()
    monkeypatch.setitem(sdpa._config, "flash_attn", dict(sdpa._config["flash_attn"],
                                                         support_dtypes=(paddle.float16, paddle.bfloat16)))
    return sdpa.can_use_flash_attention(dataclasses.replace(param, dtype=(dtype,) * 3))


@pytest.mark.parametrize("dtype", [paddle.float16, paddle.bfloat16])
def test_selector_takes_flash_for_head_dim_64_under_amp(monkeypatch, dtype):
    seen = _record_selection(monkeypatch)
    Attention(128, 2)(paddle.randn([1, 5, 128]))      # head_dim 64
    Attention(240, 4)(paddle.randn([1, 5, 240]))      # head_dim 60: not a multiple of 8
    (s_param, _), (t_param, _) = seen
    assert _flash_allowed(s_param, dtype, monkeypatch)
    assert not _flash_allowed(t_param, dtype, monkeypatch)
    # what the explicit scale did: no flash attention even at head_dim 64
    assert not _flash_allowed(dataclasses.replace(s_param, scale=0.125), dtype, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flash_attention_selected_on_gpu(monkeypatch, dtype):
    if dtype == "bfloat16" and not paddle.device.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    seen = _record_selection(monkeypatch)
    previous = paddle.get_device()
    paddle.set_device("gpu")
    try:
        layer = Attention(128, 2)
        layer.to(dtype=dtype)
        out = layer(paddle.randn([2, 197, 128]).astype(dtype))
        out.astype("float32").sum().backward()
    finally:
        paddle.set_device(previous)
    assert seen and seen[-1][1] == "flash_attn"
    assert seen[-1][0].scale is None
