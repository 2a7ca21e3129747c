"""Fail early, with the fix, when Paddle is missing or too old."""
from passl.errors import PasslError

MIN_PADDLE = (3, 0)


def check_paddle():
    try:
        import paddle
    except ImportError:
        raise PasslError(
            "PaddlePaddle is not installed. Install it first: `pip install paddlepaddle` for the CPU, "
            "or paddlepaddle-gpu as https://www.paddlepaddle.org.cn/install shows for your CUDA.") from None
    version = paddle.__version__
    parts = version.split(".")
    if version not in ("0.0.0",) and tuple(int(p) for p in parts[:2] if p.isdigit()) < MIN_PADDLE:
        raise PasslError(f"PaddlePaddle {version} is too old; this toolkit needs >= "
                         f"{'.'.join(map(str, MIN_PADDLE))}. Upgrade it with pip.")
    return version
