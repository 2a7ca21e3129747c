"""CPU settings: the math-library environment set before paddle is imported (configure_cpu_threads)
and the runtime settings made once it is (configure_cpu_runtime).

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
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def configure_cpu_runtime(environ=None):
    """Settings for a CPU run made once paddle is imported; a setting the user made is kept.

    - Paddle's strided (view) kernels are turned off. With them on, transpose, unbind and slicing
      return views, and every matmul, reshape or elementwise op that later reads a view takes a
      slow strided path: one attention layer took 128 ms forward+backward instead of 48 ms
      (benchmarks/README.md). Contiguous copies are what Paddle did before views existed.
    - glibc keeps freed memory for reuse (see keep_freed_memory).
    Returns the names of what it changed.
    """
    environ = os.environ if environ is None else environ
    changed = []
    if STRIDE_FLAG not in environ:
        import paddle
        paddle.set_flags({STRIDE_FLAG: False})
        changed.append(STRIDE_FLAG)
    if not any(key in environ for key in MALLOC_ENV) and keep_freed_memory():
        changed.append("malloc")
    return changed


def keep_freed_memory():
    """Make glibc's malloc keep freed memory instead of returning it to the kernel (Linux only).

    Paddle's CPU tensors come straight from malloc. By default glibc serves big blocks (the 51 MB
    stem activations of a batch of 16) with a fresh mmap and trims the heap after large frees, so
    every step faults in and zeroes ~0.5 GB of new pages (lvvit_t b16 on 2 cores: 4.7 s per step
    instead of 3.0 s, benchmarks/README.md).
    With mmap off and no trimming, a step reuses the previous step's memory; the process keeps its
    peak footprint, as GPU caching allocators do. Returns False where mallopt is unavailable.
    """
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return bool(mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2 ** 31 - 1)
                and mallopt(m_top_pad, 64 << 20))
