"""Mixed precision settings: on for GPUs by default, off (with a message) where Paddle has none."""
import contextlib
import warnings

import paddle
import pytest

from passl.engine.amp import AmpSettings, resolve_amp


class FakeGpuAmp:
    """Paddle's AMP as on a GPU (auto_cast does nothing on the CPU): ``supported`` dtypes pass
    paddle.amp.is_*_supported and are turned on by auto_cast, as Paddle's amp_guard reports them through
    is_autocast_enabled / get_autocast_dtype; others are refused with Paddle's warning."""

    def __init__(self, monkeypatch, supported=("float16", "bfloat16"), claimed=None):
        self.state = None
        claimed = supported if claimed is None else claimed
        monkeypatch.setattr(paddle.amp, "is_float16_supported", lambda device=None: "float16" in claimed)
        monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda device=None: "bfloat16" in claimed)
        monkeypatch.setattr(paddle.device.cuda, "get_device_name", lambda device=None: "Tesla V100")

        @contextlib.contextmanager
        def auto_cast(enable=True, level="O1", dtype="float16", **kw):
            if enable and dtype not in supported:
                warnings.warn(f"For {dtype}, amp only support NVIDIA GPU with Compute Capability 8.0 or higher")
                enable = False
            self.state, previous = (dtype if enable else None), self.state
            try:
                yield
            finally:
                self.state = previous
        monkeypatch.setattr(paddle.amp, "auto_cast", auto_cast)
        monkeypatch.setattr(paddle.amp, "is_autocast_enabled", lambda device=None: self.state is not None)
        monkeypatch.setattr(paddle.amp, "get_autocast_dtype", lambda device=None: self.state or "float16")


def test_auto_means_gpu_only(monkeypatch):
    assert not resolve_amp({"enable": "auto"}, "cpu", log=None).enabled
    FakeGpuAmp(monkeypatch)
    gpu = resolve_amp({"enable": "auto"}, "gpu", log=None)
    assert gpu.enabled and gpu.scaler is not None and gpu.describe() == "AMP O1 float16"
    bf16 = resolve_amp({"enable": True, "dtype": "bfloat16", "level": "O2"}, "gpu", log=None)
    assert bf16.scaler is None and bf16.describe() == "AMP O2 bfloat16"     # bfloat16 needs no loss scaling


def test_bfloat16_on_a_gpu_without_it_is_turned_off_with_a_warning_and_logged_as_off(monkeypatch):
    FakeGpuAmp(monkeypatch, supported=("float16",))
    info, warned = [], []
    amp = resolve_amp({"enable": True, "dtype": "bfloat16"}, "gpu", log=info.append, warn=warned.append)
    assert not amp.enabled and amp.scaler is None and amp.describe() == "AMP off (float32)"
    assert len(warned) == 1 and "no bfloat16 mixed precision on this GPU (Tesla V100)" in warned[0]
    assert "-o amp.dtype=float16" in warned[0] and not info


def test_what_paddle_really_applies_is_read_back(monkeypatch):
    """A device Paddle claims support for but whose auto_cast stays off (bfloat16 on the CPU in
    Paddle 3.3.1: is_bfloat16_supported(CPUPlace) is True, amp_guard turns itself off)."""
    FakeGpuAmp(monkeypatch, supported=(), claimed=("bfloat16",))
    warned = []
    amp = resolve_amp({"enable": True, "dtype": "bfloat16"}, "gpu", log=None, warn=warned.append)
    assert not amp.enabled and amp.describe() == "AMP off (float32)"
    assert "Paddle did not turn on bfloat16 mixed precision" in warned[0] and "Compute Capability 8.0" in warned[0]


def test_bfloat16_asked_for_on_this_cpu_is_logged_as_what_paddle_does():
    warned = []
    amp = resolve_amp({"enable": True, "dtype": "bfloat16"}, "cpu", log=None, warn=warned.append)
    enabled, dtype, _ = AmpSettings(True, "O1", "bfloat16").read_back()
    assert amp.enabled == enabled and (amp.describe() == "AMP O1 bfloat16") == (enabled and dtype == "bfloat16")
    assert bool(warned) != amp.enabled


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


@pytest.mark.gpu
@pytest.mark.skipif(not (paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0),
                    reason="Paddle's auto_cast turns itself off on the CPU")
def test_on_a_real_gpu_the_logged_state_is_paddles():
    paddle.set_device("gpu")
    for dtype in ("float16", "bfloat16"):
        warned = []
        amp = resolve_amp({"enable": True, "dtype": dtype}, "gpu", log=None, warn=warned.append)
        supported = paddle.amp.is_bfloat16_supported() if dtype == "bfloat16" else paddle.amp.is_float16_supported()
        assert amp.enabled == bool(supported) and bool(warned) != amp.enabled
        assert amp.describe() == (f"AMP O1 {dtype}" if supported else "AMP off (float32)")
