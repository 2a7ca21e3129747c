"""Test-wide setup: the process set-up of every entry point before paddle is imported, then the CPU
runtime settings a CPU run of tools/train.py makes (kernel flags, malloc, the CPU fast paths), so the
tests run the code a CPU training run runs. Fixture: ``repo_root``."""
import os
import sys

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
