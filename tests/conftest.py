"""Test-wide setup: CPU thread settings before paddle is imported, a seeded paddle per test."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from passl.utils.cpu_threads import configure_cpu_runtime, configure_cpu_threads  # noqa: E402

configure_cpu_threads()     # before paddle is imported
configure_cpu_runtime()     # the settings a CPU run of tools/train.py uses

import pytest  # noqa: E402


@pytest.fixture
def repo_root():
    return ROOT
