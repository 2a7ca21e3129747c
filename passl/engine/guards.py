"""What keeps a run from losing work: checks before training starts, a stop on Ctrl-C or SIGTERM that
saves a resumable checkpoint, a stop on a non-finite loss agreed by every rank, and a clear message
when a rank fails or loses its peers.

The non-finite and stop flags stay on the device during training; ``RunFlags.sync`` reads them back
(and all-reduces them over ranks) once per log interval, so no step waits on the host.
"""
import contextlib
import os
import re
import shutil
import signal

import numpy as np
import paddle

from passl.errors import PasslError, WriteError
from passl.utils import distributed as du
from passl.utils.fileio import (DirectoryLock, ensure_writable_dir, format_bytes, move_aside,
                                remove_stale_temporaries)

__all__ = ["claim_output_dir", "run_files", "disk_need", "check_disk", "RunFlags", "NonFiniteLoss", "Interrupted",
           "stop_on_signals", "explain_failure"]

_NO_BAD_STEP = 2 ** 62
# Words in the errors Paddle's collectives raise when another rank has gone away
_PEER_LOST = ("TIMEOUT", "Timeout", "timed out", "Connection", "connection", "NCCL", "gloo", "closed")


# the files that hold a run's progress: a fresh run never starts over them
RUN_FILES = ("metrics.jsonl", "latest.pdckpt", "best.pdckpt", "best_model.pdparams", "best_model.safetensors")
_EPOCH_FILE = re.compile(r"^epoch_\d+\.pdckpt$")
SLACK = 64 << 20   # logs, config.yaml, VisualDL records


def run_files(output_dir):
    """The names of the files in ``output_dir`` that hold a run's progress (checkpoints, metrics)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n in RUN_FILES or _EPOCH_FILE.match(n))


@contextlib.contextmanager
def claim_output_dir(output_dir, main=True, resume=False, overwrite=False, log=print):
    """Hold ``output_dir`` for one training run (main process; the others do nothing): a lock that the
    OS releases when the process ends however it ends, so no two runs ever write into one folder.

    A fresh run (not ``resume``) never starts over a run's files (``run_files``): it stops naming
    --resume and --overwrite, or, with ``overwrite``, renames the old folder to
    ``output_dir.old-<time>`` and starts in a new one. Temporaries of writes killed half-way are removed.
    """
    if not main:
        yield None
        return
    ensure_writable_dir(output_dir, "output_dir", "-o output_dir=...")
    lock = DirectoryLock(output_dir, "training run", "output_dir").acquire()
    try:
        existing = [] if resume else run_files(output_dir)
        if existing and not overwrite:
            shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
            raise PasslError(f"output_dir {output_dir} holds a run ({shown}): continue it with --resume, or pass "
                             f"--overwrite to move it to {os.path.normpath(output_dir)}.old-<time> and start anew, "
                             "or choose another output_dir with -o output_dir=...")
        if existing:
            moved = move_aside(output_dir)      # under the lock: no run of that folder is going on
            lock.release(moved_to=moved)
            log(f"--overwrite: moved the earlier run in {output_dir} to {moved}")
            ensure_writable_dir(output_dir, "output_dir", "-o output_dir=...")
            lock = DirectoryLock(output_dir, "training run", "output_dir").acquire()
        removed = remove_stale_temporaries(output_dir)
        if removed:
            size = format_bytes(sum(n for _, n in removed))
            log(f"removed {len(removed)} temporary file(s) of an interrupted write ({size}): "
                f"{', '.join(os.path.basename(p) for p, _ in removed[:3])}")
        lock.describe()
        yield lock
    finally:
        lock.release()


def disk_need(model, with_ema, keep_last):
    """Bytes a run's files take at their peak, estimated from ``model`` (float32 weights):
    {checkpoint, weights, checkpoints (how many exist at once), peak}.

    A checkpoint holds the model, Adam's two moments and the EMA. At the peak, a new epoch checkpoint is
    written while ``keep_last`` others (at least 1: latest), and the best one, still exist; the best weights
    are written twice (.pdparams, .safetensors), one of them into a temporary beside the old file."""
    weights = sum(int(np.prod(p.shape)) for p in model.parameters()) * 4
    checkpoint = weights * (4 if with_ema else 3)
    count = max(keep_last, 1) + 2
    return {"checkpoint": checkpoint, "weights": weights, "checkpoints": count,
            "peak": count * checkpoint + 3 * weights + SLACK}


def _bytes_held(output_dir):
    """Bytes the run files in ``output_dir`` hold already (hard links counted once)."""
    inodes = {}
    for name in run_files(output_dir):
        with contextlib.suppress(OSError):
            info = os.stat(os.path.join(output_dir, name))
            inodes[info.st_ino] = info.st_size
    return sum(inodes.values())


def check_disk(output_dir, model, with_ema, keep_last=3, main=True):
    """Refuse to start when ``output_dir`` cannot hold the run's files at their peak (``disk_need``),
    counting what its run files (on --resume) hold already. Main process only."""
    if not main:
        return
    need = disk_need(model, with_ema, keep_last)
    more = need["peak"] - _bytes_held(output_dir)
    free = shutil.disk_usage(output_dir).free
    if free < more:
        checkpoint, weights = format_bytes(need["checkpoint"]), format_bytes(need["weights"])
        raise WriteError(
            f"output_dir {output_dir} has {format_bytes(free)} free; this run needs {format_bytes(more)} more at "
            f"its peak: {need['checkpoints']} checkpoints of ~{checkpoint} (train.keep_last {keep_last}, the one "
            f"being written and the best), best_model.pdparams and .safetensors of ~{weights} each (and one more "
            f"while replaced) and {format_bytes(SLACK)} for logs. Free space, lower train.keep_last, or choose "
            "another output_dir")


class NonFiniteLoss(Exception):
    """The run stops on non-finite losses: ``step`` is the global step of the first one, or, with a loss
    scaler that skips such steps, of the last of ``consecutive`` in a row."""

    def __init__(self, step, consecutive=1):
        what = f"{consecutive} consecutive non-finite losses" if consecutive > 1 else "non-finite loss"
        super().__init__(f"{what} at global step {step}")
        self.step, self.consecutive = step, consecutive


class Interrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM) and every rank has reached the same step."""


class RunFlags:
    """Non-finite losses and skipped steps (counted on the device) and the stop request (set by a signal
    handler).

    ``max_nonfinite``: 1 without a loss scaler, where the first non-finite loss stops the run (its update
    has already spoiled the weights). With a float16 GradScaler, which skips the update of a step whose
    gradients are not finite, a step with a non-finite loss is skipped and counted, and only
    ``max_nonfinite`` of them in a row stop the run (``amp.max_nonfinite_steps``).

    ``sync`` reads the flags once per log interval; it sets ``skipped`` (steps the scaler skipped in this
    process's run so far), ``skipped_in_interval`` (since the previous sync) and ``skipped_in_epoch``
    (since ``new_epoch``).
    """

    def __init__(self, max_nonfinite=1):
        self.max_nonfinite = int(max_nonfinite)
        self.stop_requested = False
        self._stop_step = paddle.full([], _NO_BAD_STEP, dtype="int64")
        self._step_bad = None                                   # a non-finite loss in the current step
        self._in_a_row = paddle.zeros([], dtype="int64")        # steps with non-finite losses in a row
        self._skipped = paddle.zeros([], dtype="int64")
        self.skipped = self.skipped_in_interval = self.skipped_in_epoch = 0

    def request_stop(self):
        self.stop_requested = True

    def watch(self, loss, step):
        """Note a non-finite ``loss`` (0-d) of a micro-batch of global ``step``; device ops only, no host sync."""
        bad = paddle.logical_not(paddle.isfinite(loss.astype("float32")).reshape([]))
        if self.max_nonfinite == 1:
            self._stop_step = paddle.where(bad, paddle.minimum(self._stop_step, paddle.full([], step, "int64")),
                                           self._stop_step)
        else:
            self._step_bad = bad if self._step_bad is None else paddle.logical_or(self._step_bad, bad)

    def end_step(self, step, skipped=None):
        """Close optimizer step ``step``: ``skipped`` is the scaler's device flag (step.found_inf) or None.
        Device ops only."""
        if skipped is not None:
            self._skipped = self._skipped + skipped.astype("int64").sum()
        if self._step_bad is None:
            return
        self._in_a_row = paddle.where(self._step_bad, self._in_a_row + 1, paddle.zeros_like(self._in_a_row))
        reached = self._in_a_row >= self.max_nonfinite
        self._stop_step = paddle.where(reached, paddle.minimum(self._stop_step, paddle.full([], step, "int64")),
                                       self._stop_step)
        self._step_bad = None

    def new_epoch(self):
        self.skipped_in_epoch = 0

    def stop_now(self):
        """True when a stop can act at once: a single process has no peers to agree with."""
        return self.stop_requested and du.world_size() == 1

    def sync(self):
        """One host sync, all-reduced over ranks. Raises NonFiniteLoss when any rank saw a non-finite
        loss (``max_nonfinite`` in a row); returns whether any rank asked to stop."""
        flags = paddle.stack([self._stop_step, paddle.full([], -int(self.stop_requested), "int64"),
                              -self._skipped])
        bad, stop, skipped = (int(v) for v in du.all_reduce(flags, "min").numpy())
        skipped = -skipped          # every rank skips the same steps: their gradients are all-reduced
        self.skipped_in_interval = skipped - self.skipped
        self.skipped_in_epoch += self.skipped_in_interval
        self.skipped = skipped
        if bad != _NO_BAD_STEP:
            raise NonFiniteLoss(bad, self.max_nonfinite)
        return stop < 0

    def agree_to_stop(self):
        """At the end of an epoch: whether any rank asked to stop, so that all stop after the same epoch."""
        if du.world_size() > 1:
            stop = du.all_reduce(paddle.full([1], int(self.stop_requested), "int64"), "max")
            self.stop_requested = bool(int(stop.numpy()[0]))
        return self.stop_requested


def nonfinite_message(step, epoch, output_dir, consecutive=1):
    """What the user sees when the loss of global ``step`` in ``epoch`` (0-based) is not finite, or the
    last of ``consecutive`` non-finite losses in a row that the loss scaler skipped."""
    kept = os.path.join(output_dir, "latest.pdckpt")
    kept = kept if os.path.exists(kept) else "none yet"
    what = (f"the loss was NaN or infinite in {consecutive} consecutive steps up to global step {step} "
            f"(epoch {epoch + 1}; the loss scaler skipped their updates)" if consecutive > 1 else
            f"the loss became NaN or infinite at global step {step} (epoch {epoch + 1})")
    return (f"error: {what}; stopping without saving. Last good checkpoint: {kept}. Lower the lr, set "
            "train.grad_clip, or check the data, then --resume.")


@contextlib.contextmanager
def stop_on_signals(flags, log):
    """Within the block, SIGINT and SIGTERM call ``flags.request_stop()`` (the loop then saves and
    returns); a second Ctrl-C aborts at once. The previous handlers come back afterwards. A signal the
    process was started with ignored stays ignored, as Python leaves it: a shell script's ``train.py &``
    ignores SIGINT, so that a Ctrl-C meant for the script does not stop the run."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    again = "press Ctrl-C again" if previous[signal.SIGINT] is not signal.SIG_IGN else "send the signal again"

    def handler(signum, frame):
        if flags.stop_requested:   # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        flags.request_stop()
        log.warning(f"signal {signum}: stopping after this step and saving a resumable checkpoint "
                    f"({again} to abort without saving)")

    try:
        for s, old in previous.items():
            if old is not signal.SIG_IGN:
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
    """With several processes, say which rank failed, or that it lost its peers (then another rank died
    first). Losing the peers becomes a PasslError (one line, no traceback: the cause is elsewhere); a
    rank's own failure is logged and propagates with its traceback. A PasslError explains itself.

    What this cannot reach: when the peer dies while this rank waits inside a collective run by Paddle's
    C++ threads (the gradient all-reduce of the backward pass), gloo and NCCL abort the process
    ("terminate called after throwing an instance of 'gloo::TimeoutException'") before Python sees an
    error; README "Troubleshooting" says what a user then sees."""
    try:
        yield
    except PasslError:
        raise
    except Exception as e:
        if du.world_size() > 1:
            message = failure_message(e, du.rank(), du.world_size())
            if _lost_peer(e):
                raise PasslError(message) from None
            log.error(message)
        raise


def _lost_peer(error):
    return any(word in str(error) for word in _PEER_LOST)


def failure_message(error, rank, world_size):
    """One line for the launcher's log of ``rank``: its own failure, or the lost contact with its peers."""
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else ""
    if _lost_peer(error):
        return (f"rank {rank} of {world_size}: lost contact with the other processes "
                f"({type(error).__name__}: {first_line}); another rank probably died first - its "
                "error is in the launcher's log directory (log/workerlog.<rank> by default)")
    return (f"rank {rank} of {world_size} failed: {type(error).__name__}: {first_line} "
            f"(the launcher stops the other ranks; traceback in log/workerlog.{rank})")
