"""Process set-up for entry points. Library imports change nothing in the process; every script in
tools/ and benchmarks/ (and tests/conftest.py) calls ``configure_process()`` once, first:

    sys.path.insert(0, <repo root>)
    from passl.utils.runtime import configure_process
    configure_process()

It must run before paddle is imported (the math libraries read their thread settings when they
load), which is why ``import passl`` does not import paddle. What depends on the device is set
later, once it is known: ``passl.utils.distributed.select_device`` calls
``passl.utils.cpu_threads.configure_cpu_runtime()`` for a CPU run (kernel flags, malloc, the CPU
fast paths of passl/utils/cpu_fast.py).
"""
from passl.utils.cpu_threads import configure_cpu_threads
from passl.utils.paddle_check import check_paddle, import_paddle_quietly

__all__ = ["configure_process"]


def configure_process(environ=None):
    """Set the environment paddle reads at import (OMP_NUM_THREADS = the cores this process may use,
    MKL_DEBUG_CPU_TYPE on AMD, GLOG_minloglevel=2; values already set are kept, see
    passl/utils/cpu_threads.py), then import paddle without its import notices and check its version.
    Returns the environment variables it set. Call it once, before anything imports paddle."""
    applied = configure_cpu_threads(environ)
    import_paddle_quietly()
    check_paddle()
    return applied
