"""Run logging: console + train.log, metrics.jsonl (one JSON per epoch), VisualDL scalars, and
loss meters that accumulate on the device so that logging does not synchronise every step."""
import json
import logging
import os
import sys

import paddle

__all__ = ["setup_logger", "MetricsWriter", "DeviceMeter", "format_eta", "progress_bar"]


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
            file_handler = logging.FileHandler(os.path.join(output_dir, "train.log"), encoding="utf-8")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            logger.addHandler(file_handler)
    else:
        logger.setLevel(logging.WARNING)
        errors = logging.StreamHandler(sys.stderr)
        errors.setFormatter(logging.Formatter(f"[rank {os.environ.get('PADDLE_TRAINER_ID', '?')}] %(message)s"))
        logger.addHandler(errors)
    return logger


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
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.scalars({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"},
                     record["epoch"], prefix="epoch/")

    def close(self):
        if self.vdl is not None:
            self.vdl.close()
            self.vdl = None


class DeviceMeter:
    """Sums named scalar tensors on the device; ``means()`` syncs once and resets."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, values):
        """``values``: {name: 0-d tensor}. No host synchronisation."""
        for key, value in values.items():
            value = value.detach().astype("float32").reshape([])
            self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.count += 1

    def means(self, reset=True):
        """{name: float} averaged over the additions since the last reset (one device->host copy)."""
        if not self.count:
            return {}
        keys = list(self.sums)
        host = paddle.stack([self.sums[k] for k in keys]).numpy() / self.count
        out = {k: float(v) for k, v in zip(keys, host)}
        if reset:
            self.sums, self.count = {}, 0
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
