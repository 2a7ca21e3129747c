"""CPU math-library settings that must be in the environment before paddle is imported.

Paddle's CPU build runs matrix products on one thread unless OMP_NUM_THREADS says otherwise, and
its bundled MKL takes a slow code path on AMD processors unless MKL_DEBUG_CPU_TYPE=5. That variable
forces the AVX2 path, so it is set on AMD only: on an AVX-512 Intel CPU it makes sgemm ~1.5x slower
(measured with benchmarks/). Values the user already set are kept.
"""
import os
import sys


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_vendor():
    """'GenuineIntel', 'AuthenticAMD', ... from /proc/cpuinfo; '' where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def configure_cpu_threads(environ=None):
    """Fill in OMP_NUM_THREADS (and MKL_DEBUG_CPU_TYPE on AMD) unless set. Returns what it set.

    Also GLOG_minloglevel=2: Paddle's C++ INFO and WARNING lines ("New Executor is Running", ...)
    would otherwise interleave with the tools' progress output; errors are still printed.
    Has no effect if paddle is already imported; call it first.
    """
    environ = os.environ if environ is None else environ
    wanted = {"OMP_NUM_THREADS": str(available_cores()), "GLOG_minloglevel": "2"}
    if cpu_vendor() == "AuthenticAMD":
        wanted["MKL_DEBUG_CPU_TYPE"] = "5"
    applied = {}
    for key, value in wanted.items():
        if key not in environ:
            environ[key] = value
            applied[key] = value
    return applied


def paddle_already_imported():
    return "paddle" in sys.modules


STRIDE_FLAG = "FLAGS_use_stride_kernel"


def configure_cpu_kernels(environ=None):
    """Turn off Paddle's strided (view) kernels for a CPU run, unless the user set the flag.

    With them on, transpose, unbind and slicing return views, and every matmul, reshape or
    elementwise op that later reads a view takes a slow strided path on the CPU: attention ran
    ~2.7x slower and the lvvit_t training step ~1.3x slower (benchmarks/bench_train.py).
    Contiguous copies are what Paddle did before views existed. Returns True if it changed the flag.
    """
    environ = os.environ if environ is None else environ
    if STRIDE_FLAG in environ:
        return False
    import paddle
    paddle.set_flags({STRIDE_FLAG: False})
    return True
