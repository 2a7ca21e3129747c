"""Test-wide setup: the process set-up of every entry point before paddle is imported, then the CPU
runtime settings a CPU run of tools/train.py makes (kernel flags, malloc, the CPU fast paths), so the
tests run the code a CPU training run runs. Fixtures: ``repo_root``; every test runs with SIGINT
handled as in a terminal (``terminal_sigint``)."""
import os
import signal
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from passl.utils.runtime import configure_process  # noqa: E402

configure_process()         # before paddle is imported

from passl.utils.cpu_threads import configure_cpu_runtime  # noqa: E402

configure_cpu_runtime()     # what select_device does for a CPU run

import pytest  # noqa: E402


@pytest.fixture
def repo_root():
    return ROOT


@pytest.fixture(autouse=True)
def terminal_sigint():
    """Ctrl-C raises KeyboardInterrupt in the test process and in the processes it starts, as in a
    terminal, also when the suite was started in the background by a shell without job control, which
    starts it with SIGINT ignored (and the runs would then keep ignoring it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests skip, saying why, where Paddle has no CUDA device (run them with ``pytest -m gpu``)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import paddle
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return
    reason = "needs a CUDA GPU and paddlepaddle-gpu (this Paddle: " + (
        "no CUDA device visible)" if paddle.is_compiled_with_cuda() else "a CPU build)")
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))
