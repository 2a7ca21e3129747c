"""Mixed precision: decide whether it is on, build the autocast context and the loss scaler."""
import contextlib

import paddle

__all__ = ["AmpSettings", "resolve_amp"]


class AmpSettings:
    """Resolved ``amp:`` section. ``autocast()`` gives a context manager; ``scaler`` is a
    GradScaler for float16 (bfloat16 needs none) or None when AMP is off."""

    def __init__(self, enabled=False, level="O1", dtype="float16"):
        self.enabled, self.level, self.dtype = enabled, level, dtype
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=2.0 ** 16) if enabled and dtype == "float16" else None

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, level=self.level, dtype=self.dtype)

    def float32_weights_autocast(self):
        """The autocast context for a model whose weights stay float32 (the EMA): O2 would run every op
        of it in float16/bfloat16 (auto_cast O2 casts all inputs, as for a decorated model), so it runs
        under O1, where only the ops of Paddle's white list (matmul, conv) compute in half precision."""
        if not self.enabled:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, level="O1", dtype=self.dtype)

    def decorate(self, model, optimizer):
        """O2 keeps float16/bfloat16 weights with float32 master copies in the optimizer."""
        if self.enabled and self.level == "O2":
            return paddle.amp.decorate(models=model, optimizers=optimizer, level="O2", dtype=self.dtype,
                                       master_weight=True)
        return model, optimizer

    def describe(self):
        return f"AMP {self.level} {self.dtype}" if self.enabled else "AMP off (float32)"


def _bf16_on_cpu():
    check = getattr(paddle.amp, "is_bfloat16_supported", None)
    try:
        return bool(check and check(paddle.CPUPlace()))
    except Exception:
        return False


def resolve_amp(amp_cfg, device, log=print):
    """``amp: {enable: auto|true|false, level: O1|O2, dtype: float16|bfloat16}`` -> AmpSettings.

    ``auto`` means on for GPU, off for CPU. Asked for on the CPU, it stays on only for bfloat16
    where Paddle supports it there; otherwise it is turned off with a message.
    """
    enable, level, dtype = amp_cfg.get("enable", "auto"), amp_cfg.get("level", "O1"), amp_cfg.get("dtype", "float16")
    if enable == "auto":
        enable = device == "gpu"
    if enable and device == "cpu" and not (dtype == "bfloat16" and _bf16_on_cpu()):
        if log:
            log(f"amp.enable is true but Paddle has no {dtype} mixed precision on the CPU: training in float32")
        enable = False
    return AmpSettings(bool(enable), level, dtype)

