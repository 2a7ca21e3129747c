"""What keeps a run from losing work: checks before training starts, a stop on Ctrl-C or SIGTERM that
saves a resumable checkpoint, a stop on a non-finite loss agreed by every rank, and a clear message
when a rank fails or loses its peers.

The non-finite and stop flags stay on the device during training; ``RunFlags.sync`` reads them back
(and all-reduces them over ranks) once per log interval, so no step waits on the host.
"""
import contextlib
import os
import shutil
import signal

import numpy as np
import paddle

from passl.errors import PasslError
from passl.utils import distributed as du

__all__ = ["prepare_output_dir", "check_disk", "RunFlags", "NonFiniteLoss", "Interrupted", "stop_on_signals",
           "explain_failure"]

_NO_BAD_STEP = 2 ** 62
# Words in the errors Paddle's collectives raise when another rank has gone away
_PEER_LOST = ("TIMEOUT", "Timeout", "timed out", "Connection", "connection", "NCCL", "gloo", "closed")


def prepare_output_dir(output_dir, main=True, fresh=True):
    """Create ``output_dir`` and prove it writable (main process only). ``fresh``: a new run, so
    the metrics.jsonl of an earlier one is removed."""
    if not main:
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PasslError(f"output_dir {output_dir} is not writable ({e.strerror}); "
                         "pick another with -o output_dir=...") from None
    if fresh and os.path.exists(os.path.join(output_dir, "metrics.jsonl")):
        os.remove(os.path.join(output_dir, "metrics.jsonl"))


def check_disk(output_dir, model, with_ema, main=True):
    """Refuse to start when ``output_dir`` cannot hold two checkpoints and some slack (main process)."""
    if not main:
        return
    numel = sum(int(np.prod(p.shape)) for p in model.parameters())
    per_checkpoint = numel * 4 * (4 if with_ema else 3)   # model, Adam m and v, EMA
    need = 2 * per_checkpoint + (64 << 20)
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise PasslError(f"output_dir {output_dir} has {free / 2**30:.2f} GiB free; a checkpoint needs "
                         f"~{per_checkpoint / 2**30:.2f} GiB and two must fit while one is replaced. "
                         "Free some space or choose another output_dir.")


class NonFiniteLoss(Exception):
    """The loss of some rank was NaN or infinite; ``step`` is the first such global step."""

    def __init__(self, step):
        super().__init__(f"non-finite loss at global step {step}")
        self.step = step


class Interrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM) and every rank has reached the same step."""


class RunFlags:
    """The first non-finite loss (on the device) and the stop request (set by a signal handler)."""

    def __init__(self):
        self.stop_requested = False
        self._first_bad_step = paddle.full([], _NO_BAD_STEP, dtype="int64")

    def request_stop(self):
        self.stop_requested = True

    def watch(self, loss, step):
        """Remember ``step`` if ``loss`` (0-d) is not finite; device ops only, no host sync."""
        finite = paddle.isfinite(loss.astype("float32")).reshape([])
        self._first_bad_step = paddle.where(finite, self._first_bad_step,
                                            paddle.minimum(self._first_bad_step, paddle.full([], step, "int64")))

    def stop_now(self):
        """True when a stop can act at once: a single process has no peers to agree with."""
        return self.stop_requested and du.world_size() == 1

    def sync(self):
        """One host sync, all-reduced over ranks. Raises NonFiniteLoss when any rank saw a non-finite
        loss; returns whether any rank asked to stop."""
        flags = paddle.stack([self._first_bad_step, paddle.full([], -int(self.stop_requested), "int64")])
        bad, stop = (int(v) for v in du.all_reduce(flags, "min").numpy())
        if bad != _NO_BAD_STEP:
            raise NonFiniteLoss(bad)
        return stop < 0

    def agree_to_stop(self):
        """At the end of an epoch: whether any rank asked to stop, so that all stop after the same epoch."""
        if du.world_size() > 1:
            stop = du.all_reduce(paddle.full([1], int(self.stop_requested), "int64"), "max")
            self.stop_requested = bool(int(stop.numpy()[0]))
        return self.stop_requested


def nonfinite_message(step, epoch, output_dir):
    """What the user sees when the loss of global ``step`` in ``epoch`` (0-based) is not finite."""
    kept = os.path.join(output_dir, "latest.pdckpt")
    kept = kept if os.path.exists(kept) else "none yet"
    return (f"error: the loss became NaN or infinite at global step {step} (epoch {epoch + 1}); "
            f"stopping without saving. Last good checkpoint: {kept}. Lower the lr, set "
            "train.grad_clip, or check the data, then --resume.")


@contextlib.contextmanager
def stop_on_signals(flags, log):
    """Within the block, SIGINT and SIGTERM call ``flags.request_stop()`` (the loop then saves and
    returns); a second Ctrl-C aborts at once. The previous handlers come back afterwards."""
    def handler(signum, frame):
        if flags.stop_requested:   # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        flags.request_stop()
        log.warning(f"signal {signum}: stopping after this step and saving a resumable checkpoint "
                    "(press Ctrl-C again to abort without saving)")

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in previous:
            signal.signal(s, handler)
    except ValueError:   # not the main thread: no handlers
        pass
    try:
        yield flags
    finally:
        for s, old in previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(s, old)


@contextlib.contextmanager
def explain_failure(log):
    """With several processes, log which rank failed, or that it lost its peers (then another rank
    died first), before the exception propagates. A PasslError already explains itself."""
    try:
        yield
    except PasslError:
        raise
    except Exception as e:
        if du.world_size() > 1:
            log.error(failure_message(e, du.rank(), du.world_size()))
        raise


def failure_message(error, rank, world_size):
    """One line for the launcher's log of ``rank``: its own failure, or the lost contact with its peers."""
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else ""
    if any(word in text for word in _PEER_LOST):
        return (f"rank {rank} of {world_size}: lost contact with the other processes "
                f"({type(error).__name__}: {first_line}); another rank probably died first - its "
                "error is in the launcher's log directory (log/workerlog.<rank> by default)")
    return (f"rank {rank} of {world_size} failed: {type(error).__name__}: {first_line} "
            f"(the launcher stops the other ranks; traceback in log/workerlog.{rank})")
