"""Mixed precision settings: on for GPUs by default, off (with a message) where Paddle has none."""
import contextlib

import paddle

from passl.engine.amp import AmpSettings, resolve_amp


def test_auto_means_gpu_only():
    assert not resolve_amp({"enable": "auto"}, "cpu", log=None).enabled
    gpu = resolve_amp({"enable": "auto"}, "gpu", log=None)
    assert gpu.enabled and gpu.scaler is not None and gpu.describe() == "AMP O1 float16"
    bf16 = resolve_amp({"enable": True, "dtype": "bfloat16", "level": "O2"}, "gpu", log=None)
    assert bf16.scaler is None and bf16.describe() == "AMP O2 bfloat16"     # bfloat16 needs no loss scaling


def test_float16_asked_for_on_the_cpu_is_turned_off_with_a_message():
    said = []
    amp = resolve_amp({"enable": True, "dtype": "float16"}, "cpu", log=said.append)
    assert not amp.enabled and amp.scaler is None and amp.describe() == "AMP off (float32)"
    assert said == ["amp.enable is true but Paddle has no float16 mixed precision on the CPU: training in float32"]


def test_the_float32_ema_is_evaluated_under_o1_in_an_o2_run(monkeypatch):
    asked = []
    monkeypatch.setattr(paddle.amp, "auto_cast", lambda **kw: asked.append(kw) or contextlib.nullcontext())
    amp = AmpSettings(enabled=True, level="O2", dtype="bfloat16")
    with amp.autocast(), amp.float32_weights_autocast():
        pass
    assert [(a["level"], a["dtype"]) for a in asked] == [("O2", "bfloat16"), ("O1", "bfloat16")]
    assert isinstance(AmpSettings().float32_weights_autocast(), contextlib.nullcontext)
