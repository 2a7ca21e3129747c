"""The Paddle version check every entry point runs (configure_process): older than MIN_PADDLE is one
clear error naming the version and the upgrade command."""
import os
import subprocess
import sys

import paddle
import pytest

from passl.errors import PasslError
from passl.utils.paddle_check import MIN_PADDLE, check_paddle

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("version", ["3.0.0", "3.1.1", "2.6.2"])
def test_an_older_paddle_is_refused_with_the_fix(monkeypatch, version):
    monkeypatch.setattr(paddle, "__version__", version)
    with pytest.raises(PasslError, match=rf"PaddlePaddle {version} is too old.*>= 3\.2.*pip install -U"):
        check_paddle()


@pytest.mark.parametrize("version", ["3.2.0", "3.3.1", "3.10.0", "4.0.0rc1", "0.0.0"])
def test_newer_and_develop_builds_pass(monkeypatch, version):
    monkeypatch.setattr(paddle, "__version__", version)
    assert check_paddle() == version


def test_the_minimum_is_what_the_code_calls():
    """3.2 is the first Paddle with paddle.amp.is_autocast_enabled, which the CPU fast paths call."""
    assert MIN_PADDLE == (3, 2) and hasattr(paddle.amp, "is_autocast_enabled")


def test_an_entry_point_stops_with_one_line_on_an_old_paddle():
    """configure_process() (the first thing every tool runs) refuses an old Paddle before any work."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import paddle; paddle.__version__ = '3.1.0'\n"
            "from passl.utils.runtime import configure_process\n"
            "configure_process()\n"
            "print('went on')\n") % (ROOT,)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "too old" in line]
    assert len(lines) == 1 and lines[0].startswith("error: PaddlePaddle 3.1.0") and "Traceback" not in done.stderr
    assert "went on" not in done.stdout
