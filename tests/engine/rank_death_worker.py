"""Run by test_rank_death.py under `python -m paddle.distributed.launch`: tools/train.py, as a user runs it,
except that rank 1 is killed (SIGKILL: it prints nothing, as under the out-of-memory killer) when it is
about to make optimizer step KILL_AT (0-based)."""
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import train  # noqa: E402  (tools/train.py: sets up the process as the command line does)

from passl.engine.step import OptimizerStep  # noqa: E402
from passl.utils import cli  # noqa: E402
from passl.utils.distributed import rank  # noqa: E402

original, steps = OptimizerStep.step, [0]


def step(self, lr):
    if rank() == 1 and steps[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    steps[0] += 1
    original(self, lr)


OptimizerStep.step = step
cli.run(train.main, sys.argv[1:])
