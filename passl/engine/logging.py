"""Run logging: console + train.log, metrics.jsonl (one JSON per epoch), VisualDL scalars, the lines
a run prints, and loss meters that accumulate on the device so that logging does not synchronise
every step. What is logged of training is the mean over every process's samples (the meters are
all-reduced when read, once per log interval and epoch)."""
import json
import logging
import os
import sys
import time

import numpy as np
import paddle

from passl.utils import distributed as du
from passl.utils.fileio import write_text, writing

__all__ = ["setup_logger", "MetricsWriter", "DeviceMeter", "EpochReport", "format_eta", "progress_bar",
           "format_step_line", "format_epoch_line", "report_bad_images"]


def setup_logger(output_dir=None, main_process=True, name="passl"):
    """A logger writing to stdout and ``output_dir/train.log`` on the main process; other ranks
    only report warnings and errors (to stderr, which the launcher keeps per rank)."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if main_process:
        logger.setLevel(logging.INFO)
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        logger.addHandler(console)
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            file_handler = _LogFile(os.path.join(output_dir, "train.log"), encoding="utf-8")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            logger.addHandler(file_handler)
    else:
        logger.setLevel(logging.WARNING)
        errors = logging.StreamHandler(sys.stderr)
        errors.setFormatter(logging.Formatter(f"[rank {du.rank()}] %(message)s"))
        logger.addHandler(errors)
    return logger


class _LogFile(logging.FileHandler):
    """train.log: a line that cannot be written (disk full) is reported once, in one line, not as a
    traceback per log record; the console keeps every line."""

    failed = False

    def handleError(self, record):
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print(f"warning: cannot write {self.baseFilename} ({getattr(error, 'strerror', None) or error}); "
                  "log lines go to the console only from now on", file=sys.stderr, flush=True)


class MetricsWriter:
    """metrics.jsonl and VisualDL scalars under ``output_dir/vdl`` (main process only)."""

    def __init__(self, output_dir, enabled=True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.vdl = None
        if enabled:
            try:
                from visualdl import LogWriter
                self.vdl = LogWriter(logdir=os.path.join(output_dir, "vdl"))
            except ImportError:  # optional: metrics.jsonl still has everything
                self.vdl = None

    def scalars(self, values, step, prefix="train/"):
        """Write ``{name: float}`` as VisualDL scalars at ``step``."""
        if self.vdl is not None:
            for key, value in values.items():
                if value is not None:
                    self.vdl.add_scalar(tag=prefix + key, value=float(value), step=step)

    def epoch(self, record):
        """Append one JSON object for a finished epoch."""
        if not self.enabled:
            return
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.scalars({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"},
                     record["epoch"], prefix="epoch/")

    def close(self):
        if self.vdl is not None:
            self.vdl.close()
            self.vdl = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DeviceMeter:
    """Sums named scalar tensors on the device; ``means()`` reduces them over the processes, syncs
    once and resets. A micro-batch whose ``loss`` is not finite (a step the loss scaler skips) is left
    out of every mean, so one skipped step does not turn the logged losses into nan."""

    def __init__(self):
        self.sums, self.count = {}, None

    def add(self, values):
        """``values``: {name: 0-d tensor}. No host synchronisation."""
        values = {key: value.detach().astype("float32").reshape([]) for key, value in values.items()}
        kept = paddle.isfinite(values["loss"] if "loss" in values else paddle.stack(list(values.values())).sum())
        zero = paddle.zeros([], "float32")
        for key, value in values.items():
            value = paddle.where(kept, value, zero)
            self.sums[key] = value if key not in self.sums else self.sums[key] + value
        kept = kept.astype("float32")
        self.count = kept if self.count is None else self.count + kept

    def means(self, reset=True):
        """{name: float} averaged over the kept additions of every process since the last reset: one
        all-reduce (a collective: every process calls it at the same point, with the same names) and
        one device->host copy. Each addition is a micro-batch's mean and every process's micro-batches
        are equally large, so this is the mean over all processes' samples (nan if none was kept)."""
        if self.count is None:
            return {}
        keys = list(self.sums)
        totals = paddle.stack([self.sums[k] for k in keys] + [self.count])
        host = du.all_reduce(totals, "sum").numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {k: float(v) for k, v in zip(keys, host[:-1] / host[-1])}
        if reset:
            self.sums, self.count = {}, None
        return out


def format_eta(seconds):
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:d}:{minutes:02d}:{secs:02d}"


def progress_bar(total, desc, enabled=True, initial=0):
    """A tqdm bar when stdout is a terminal and this is the main process, else None."""
    if not enabled or not sys.stdout.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False)


def format_step_line(epoch, epochs, step_in_epoch, steps_per_epoch, global_step, lr, means, samples_per_s,
                     data_wait, eta_seconds, skipped=0):
    """The line logged every log interval. ``epoch`` 0-based; ``means`` {loss name: float}, 'loss'
    first; ``data_wait`` the fraction of the interval spent waiting for batches; ``skipped`` the steps
    of the interval the loss scaler skipped (shown when there are any)."""
    terms = "  ".join(f"{k} {means[k]:.4f}" for k in sorted(means, key=lambda k: (k != "loss", k)))
    skips = f"  skipped {skipped} step(s): non-finite" if skipped else ""
    return (f"epoch {epoch + 1}/{epochs} step {step_in_epoch}/{steps_per_epoch} (global {global_step})  "
            f"lr {lr:.3e}  {terms}{skips}  {samples_per_s:.1f} samples/s  data wait {data_wait:.0%}  "
            f"eta {format_eta(eta_seconds)}")


def format_epoch_line(record, is_best, path):
    """The line logged after an epoch: its metrics.jsonl record, '(best)', and the checkpoint written."""
    shown = "  ".join(f"{k} {v:.4g}" if k == "lr" else f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in record.items())
    return f"{shown}{'  (best)' if is_best else ''} -> {path}"


class EpochReport:
    """What one training epoch shows: a tqdm bar (terminal, main process), a line per log interval
    (console or above the bar, train.log, VisualDL), and the epoch's mean loss.

    Losses are summed on the device (DeviceMeter) and read back only by ``log_interval``.
    Use as a context manager, so the bar closes however the epoch ends.
    """

    def __init__(self, log, metrics, main, epoch, epochs, steps_per_epoch, global_batch, start_step=0):
        self.log, self.metrics, self.main = log, metrics, main
        self.epoch, self.epochs, self.steps_per_epoch, self.global_batch = epoch, epochs, steps_per_epoch, global_batch
        self.bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", main, start_step)
        self.interval, self.epoch_losses = DeviceMeter(), DeviceMeter()
        self._restart()

    def _restart(self):
        self.started, self.data_wait, self.steps = time.time(), 0.0, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def timed(self, batches):
        """Iterate ``batches``, counting the time spent waiting for each as data wait."""
        batches = iter(batches)
        while True:
            asked = time.time()
            try:
                item = next(batches)
            except StopIteration:
                return
            self.data_wait += time.time() - asked
            yield item

    def add(self, losses):
        """``losses``: {name: 0-d tensor} of one micro-batch; stays on the device."""
        self.interval.add(losses)
        self.epoch_losses.add({"loss": losses["loss"]})

    def step_done(self):
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def log_interval(self, step_in_epoch, global_step, lr, skipped=0):
        """Log the mean losses of all processes since the last call (one all-reduce and device->host
        copy; every process calls this) and restart the interval; ``skipped``: optimizer steps of the
        interval the loss scaler skipped."""
        means = self.interval.means()
        seconds = max(time.time() - self.started, 1e-9)
        if self.main and self.steps:
            # steps left from this epoch's position: global_step may count steps of another global batch (resume)
            eta = ((self.epochs - self.epoch) * self.steps_per_epoch - step_in_epoch) * seconds / self.steps
            line = format_step_line(self.epoch, self.epochs, step_in_epoch, self.steps_per_epoch, global_step, lr,
                                    means, self.global_batch * self.steps / seconds, self.data_wait / seconds, eta,
                                    skipped)
            if self.bar is not None:
                self.bar.set_postfix_str(f"loss {means.get('loss', float('nan')):.4f} lr {lr:.2e}")
                self.bar.write(line)
                _file_only(self.log, line)
            else:
                self.log.info(line)
            self.metrics.scalars({**means, "lr": lr, **({"skipped_steps": skipped} if skipped else {})},
                                 global_step)
        self._restart()

    def epoch_loss(self):
        """The mean loss over the micro-batches every process ran in the epoch (None if none)."""
        return self.epoch_losses.means().get("loss")


def _file_only(logger, line):
    """Write ``line`` to the log file handlers only (the console shows it above the tqdm bar)."""
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def report_bad_images(datasets, output_dir, log, main):
    """Count the images skipped as undecodable and list them all in output_dir/bad_images_<split>.txt:
    rank 0 writes those every rank's loader met (a collective: every rank calls this).
    ``datasets``: {split: dataset with a ``bad_images`` list}."""
    for split, dataset in sorted(datasets.items()):
        bad = sorted(set(getattr(dataset, "bad_images", None) or ()))
        bad = sorted(set().union(*du.gather_objects(bad)))
        if bad and main:
            listing = os.path.join(output_dir, f"bad_images_{split}.txt")
            write_text(listing, "".join(f"{path}\n" for path in bad))
            log.warning(f"{len(bad)} undecodable {split} image(s) were skipped "
                        f"(skip_bad_images: true), e.g. {bad[0]}; all listed in {listing}")
