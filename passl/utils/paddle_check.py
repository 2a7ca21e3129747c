"""Fail early, with the fix, when Paddle is missing or too old; import it without its start-up noise."""
import contextlib
import io
import sys
import warnings

from passl.errors import PasslError

# The oldest Paddle the code runs on: 3.2 brought paddle.amp.is_autocast_enabled, which the CPU fast paths
# (passl/utils/cpu_fast.py) call on every Linear forward. The model, engine, export and transform tests fail
# on 3.0.0 for that reason alone and pass on 3.2.0; 3.1.0 lacks the function too. Attention calls
# scaled_dot_product_attention without ``scale``, an argument 3.0-3.2 do not have.
MIN_PADDLE = (3, 2)
# Paddle prints these at import; the first is advice for data-parallel CPU jobs that does not apply
# to us (configure_process sets OMP_NUM_THREADS on purpose), the second concerns compiling custom
# C++ operators.
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


def _missing():
    return PasslError("PaddlePaddle is not installed. Install it first: `pip install paddlepaddle` for the CPU, "
                      "or paddlepaddle-gpu as https://www.paddlepaddle.org.cn/install shows for your CUDA.")


def import_paddle_quietly():
    """Import paddle with its import-time notices filtered from stderr and check its version (entry
    points only: this swaps sys.stderr while paddle loads, and a missing or too old Paddle ends the
    process with one line, ``error: ...``, and exit status 2, before the entry point does anything)."""
    try:
        if "paddle" not in sys.modules:
            try:
                with warnings.catch_warnings(), contextlib.redirect_stderr(_FilteredStream(sys.stderr)):
                    warnings.filterwarnings("ignore", message="No ccache found")
                    import paddle  # noqa: F401
            except ImportError:
                raise _missing() from None
        check_paddle()
    except PasslError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check_paddle():
    """Return paddle's version; PasslError when paddle is missing or older than MIN_PADDLE.
    Changes nothing in the process besides importing paddle."""
    try:
        import paddle
    except ImportError:
        raise _missing() from None
    version = paddle.__version__
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if version != "0.0.0" and major_minor < MIN_PADDLE:  # 0.0.0: a develop build
        need = ".".join(map(str, MIN_PADDLE))
        package = "paddlepaddle-gpu" if paddle.is_compiled_with_cuda() else "paddlepaddle"
        raise PasslError(f"PaddlePaddle {version} is too old; this toolkit needs >= {need}. Upgrade it: "
                         f"pip install -U '{package}>={need}' (for a GPU build, the command for your CUDA on "
                         "https://www.paddlepaddle.org.cn/install)")
    return version
