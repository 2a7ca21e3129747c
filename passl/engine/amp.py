"""Mixed precision: decide whether it is on, build the autocast context and the loss scaler."""
import contextlib
import warnings

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

    def read_back(self):
        """(enabled, dtype, Paddle's warnings) as Paddle has them inside ``autocast()``."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with self.autocast():
                enabled = bool(paddle.amp.is_autocast_enabled())
                dtype = str(paddle.amp.get_autocast_dtype()) if enabled else "float32"
        return enabled, dtype.replace("paddle.", ""), [str(w.message) for w in caught]

    def describe(self):
        return f"AMP {self.level} {self.dtype}" if self.enabled else "AMP off (float32)"


def _supported(dtype):
    """Whether Paddle supports ``dtype`` mixed precision on the current device
    (paddle.amp.is_float16_supported / is_bfloat16_supported, paddle/amp/__init__.py:62-113: on a GPU,
    compute capability 7.0+ for float16, 8.0+ with CUDA 11+ for bfloat16)."""
    check = paddle.amp.is_bfloat16_supported if dtype == "bfloat16" else paddle.amp.is_float16_supported
    try:
        return bool(check())
    except Exception:       # a device Paddle cannot describe: let the read-back decide
        return True


def resolve_amp(amp_cfg, device, log=print, warn=None):
    """``amp: {enable: auto|true|false, level: O1|O2, dtype: float16|bfloat16}`` -> AmpSettings.

    ``auto`` means on for GPU, off for CPU. What is asked for is then checked against Paddle, which
    switches mixed precision off where the device lacks it, with no more than a Python warning
    (paddle/amp/auto_cast.py:594-645: auto_cast on the CPU, float16 below compute capability 7.0,
    bfloat16 below 8.0; decorate then leaves the model float32, auto_cast.py:985-993): the settings
    returned are those Paddle really applies, read back from inside ``auto_cast``
    (paddle.amp.is_autocast_enabled / get_autocast_dtype, auto_cast.py:1375-1445), so the run's first
    log line tells the truth. ``warn`` (default ``log``) tells the user when a request was refused.
    """
    warn = warn or log
    enable, level, dtype = amp_cfg.get("enable", "auto"), amp_cfg.get("level", "O1"), amp_cfg.get("dtype", "float16")
    if enable == "auto":
        enable = device == "gpu"
    if not enable:
        return AmpSettings(False, level, dtype)
    if device == "cpu" and dtype == "float16":
        if log:
            log(f"amp.enable is true but Paddle has no {dtype} mixed precision on the CPU: training in float32")
        return AmpSettings(False, level, dtype)
    where = "the CPU" if device == "cpu" else f"this GPU ({_device_name()})"
    if not _supported(dtype):
        if warn:
            warn(f"amp.dtype {dtype}: Paddle has no {dtype} mixed precision on {where} "
                 f"(paddle.amp.is_{dtype}_supported() is False): training in float32. "
                 + ("Use -o amp.dtype=float16, or " if dtype == "bfloat16" and device == "gpu" else "Use ")
                 + "-o amp.enable=false to train in float32 without this warning")
        return AmpSettings(False, level, dtype)
    settings = AmpSettings(True, level, dtype)
    enabled, effective_dtype, said = settings.read_back()
    if not enabled or effective_dtype != dtype:
        if warn:
            reason = f" ({said[0]})" if said else ""
            warn(f"Paddle did not turn on {dtype} mixed precision on {where}{reason}: training in float32; "
                 "set -o amp.enable=false to train in float32 without this warning")
        return AmpSettings(False, level, dtype)
    return settings


def _device_name():
    try:
        return paddle.device.cuda.get_device_name()
    except Exception:
        return paddle.device.get_device()
