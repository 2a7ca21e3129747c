"""CPU settings: the math-library environment set before paddle is imported (configure_cpu_threads,
called by passl.utils.runtime.configure_process) and the runtime settings made once the run is known
to be on the CPU (configure_cpu_runtime) or on a GPU (configure_gpu_threads: Paddle's default of one
math thread per process and loader worker), both called by passl.utils.distributed.select_device.
Only a CPU run keeps every core.

Paddle's CPU build runs matrix products on one thread unless OMP_NUM_THREADS says otherwise, and
its bundled MKL takes a slow generic code path on AMD processors unless MKL_DEBUG_CPU_TYPE names the
instruction set to use: 7 (AVX-512) where the CPU has the AVX-512 subsets MKL's kernels use, else 5
(AVX2). On a 2-core AMD EPYC with AVX-512, sgemm took 14 ms with no setting, 6.5 ms with 5 and 4.5 ms
with 7, and the lvvit_t training step went from 2.05 to 1.5 s going from 5 to 7. Intel CPUs are left
to MKL: forcing AVX2 on an AVX-512 Intel CPU made sgemm ~1.5x slower. A value the CPU cannot run
(7 without AVX-512) kills the process with SIGILL, hence the flag check. Values the user already set
are kept.
"""
import os
import platform


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpuinfo_field(name):
    """The first processor's ``name`` line of /proc/cpuinfo; '' where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor():
    """'GenuineIntel', 'AuthenticAMD', ... from /proc/cpuinfo; '' where unknown."""
    return _cpuinfo_field("vendor_id")


def cpu_model():
    """'AMD EPYC 9654 96-Core Processor', ... from /proc/cpuinfo, else platform.processor()."""
    return _cpuinfo_field("model name") or platform.processor()


def cpu_flags():
    """The instruction-set flags of /proc/cpuinfo (avx2, avx512f, ...); empty where unknown."""
    return frozenset(_cpuinfo_field("flags").split())


# The AVX-512 subsets of MKL's Skylake-SP kernels (MKL_DEBUG_CPU_TYPE=7); AMD has them from Zen 4 on.
MKL_AVX512_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")


def mkl_cpu_type(vendor, flags):
    """The MKL_DEBUG_CPU_TYPE for a CPU, or None to leave MKL's own choice (Intel, unknown, no AVX2)."""
    if vendor != "AuthenticAMD":
        return None
    if all(flag in flags for flag in MKL_AVX512_FLAGS):
        return "7"
    if "avx2" in flags and "fma" in flags:
        return "5"
    return None


def configure_cpu_threads(environ=None):
    """Fill in OMP_NUM_THREADS (and MKL_DEBUG_CPU_TYPE on AMD, see mkl_cpu_type) unless set.
    Returns what it set.

    Also GLOG_minloglevel=2: Paddle's C++ INFO and WARNING lines ("New Executor is Running", ...)
    would otherwise interleave with the tools' progress output; errors are still printed.
    Has no effect if paddle is already imported; call it first.
    """
    environ = os.environ if environ is None else environ
    wanted = {"OMP_NUM_THREADS": str(available_cores()), "GLOG_minloglevel": "2"}
    mkl_type = mkl_cpu_type(cpu_vendor(), cpu_flags())
    if mkl_type is not None:
        wanted["MKL_DEBUG_CPU_TYPE"] = mkl_type
    applied = {}
    for key, value in wanted.items():
        if key not in environ:
            environ[key] = value
            applied[key] = value
    if environ is os.environ:
        _SET_HERE.update(applied)
    return applied


_SET_HERE = {}      # what configure_cpu_threads set in this process's environment (not the user's values)
GPU_RUN_THREADS = 1


def configure_gpu_threads(environ=None, set_num_threads=None):
    """Threads for a GPU run, once the device is known: the math-library threads go back to Paddle's own
    default of 1 (paddle/base/__init__.py:152-166 sets OMP_NUM_THREADS=1 when unset and warns about
    more), in this process (``paddle.base.core.set_num_threads``) and in the loader workers it starts,
    which inherit the environment. configure_cpu_threads gave every core to the process before the device
    was known; on a GPU node that is 8 ranks x (1 + 8 workers) x all cores of threads competing for the
    cores the loader workers need. An OMP_NUM_THREADS the user set is kept. Returns what it changed."""
    environ = os.environ if environ is None else environ
    if environ is os.environ and "OMP_NUM_THREADS" not in _SET_HERE:
        return {}
    environ["OMP_NUM_THREADS"] = str(GPU_RUN_THREADS)
    if set_num_threads is None:
        from paddle.base import core
        set_num_threads = core.set_num_threads
    set_num_threads(GPU_RUN_THREADS)
    return {"OMP_NUM_THREADS": str(GPU_RUN_THREADS)}


STRIDE_FLAG = "FLAGS_use_stride_kernel"
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def configure_cpu_runtime(environ=None):
    """Settings for a CPU run made once paddle is imported; a setting the user made is kept.

    - Paddle's strided (view) kernels are turned off. With them on, transpose, unbind and slicing
      return views, and every matmul, reshape or elementwise op that later reads a view takes a
      slow strided path: one attention layer took 128 ms forward+backward instead of 48 ms
      (benchmarks/README.md). Contiguous copies are what Paddle did before views existed.
    - glibc keeps freed memory for reuse (see keep_freed_memory).
    - the CPU fast paths of passl/utils/cpu_fast.py are switched on, unless PASSL_CPU_FAST_PATHS=0.
    Returns the names of what it changed.
    """
    from passl.utils import cpu_fast
    environ = os.environ if environ is None else environ
    changed = []
    if STRIDE_FLAG not in environ:
        import paddle
        paddle.set_flags({STRIDE_FLAG: False})
        changed.append(STRIDE_FLAG)
    if not any(key in environ for key in MALLOC_ENV) and keep_freed_memory():
        changed.append("malloc")
    if cpu_fast.fast_paths_wanted(environ):
        changed += cpu_fast.enable_cpu_fast_paths()
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
