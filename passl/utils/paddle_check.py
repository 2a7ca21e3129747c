"""Import Paddle once, quietly, and fail early with the fix when it is missing or too old."""
import contextlib
import io
import sys
import warnings

from passl.errors import PasslError

MIN_PADDLE = (3, 0)
# Paddle prints these at import; the first is advice for data-parallel CPU jobs that does not apply
# to us (we set OMP_NUM_THREADS on purpose), the second concerns compiling custom C++ operators.
_IMPORT_NOISE = ("OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")


class _FilteredStream(io.TextIOBase):
    def __init__(self, stream):
        self._stream = stream
        self._dropped = False  # print() writes the line end separately; drop it with its line

    def write(self, text):
        if any(noise in text for noise in _IMPORT_NOISE) or (self._dropped and text == "\n"):
            self._dropped = text != "\n"
            return len(text)
        self._dropped = False
        return self._stream.write(text)

    def flush(self):
        self._stream.flush()


def check_paddle():
    """Import paddle (without its import-time noise) and check the version; return the version."""
    if "paddle" not in sys.modules:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(_FilteredStream(sys.stderr)):
                warnings.filterwarnings("ignore", message="No ccache found")
                import paddle  # noqa: F401
        except ImportError:
            raise PasslError(
                "PaddlePaddle is not installed. Install it first: `pip install paddlepaddle` for the CPU, "
                "or paddlepaddle-gpu as https://www.paddlepaddle.org.cn/install shows for your CUDA.") from None
    import paddle
    version = paddle.__version__
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if version != "0.0.0" and major_minor < MIN_PADDLE:  # 0.0.0: a develop build
        raise PasslError(f"PaddlePaddle {version} is too old; this toolkit needs >= "
                         f"{'.'.join(map(str, MIN_PADDLE))}. Upgrade it with pip.")
    return version
