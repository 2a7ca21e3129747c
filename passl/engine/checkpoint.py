"""Checkpoints: atomic writes, latest/best/epoch files, and a resume that loses nothing.

Layout of ``output_dir``:
    epoch_0007.pdckpt   end of epoch 7 (the last ``keep_last`` are kept)
    latest.pdckpt       the newest state, end of epoch or mid-epoch (Ctrl-C)
    best.pdckpt         the epoch whose model or EMA scored the best top-1
    best_model.pdparams just the best weights (model or EMA, whichever won), for --load / export
    best_model.safetensors  the same weights as .safetensors (variant, img_size, epoch in its metadata)

A checkpoint is a dict: model, optimizer (keyed by structured parameter names, so it does not
depend on Paddle's internal tensor names), scaler, ema, epoch, batch (position in that epoch),
global_step, best, sampler (what the position means: world_size, batch_size, seed, num_samples: the
training set's size, global_batch: images per optimizer step), base_lr (the lr scaled to that global
batch), rng (paddle, numpy, python), config, and in a mid-epoch checkpoint of several processes
bn_by_rank (each rank's own BatchNorm statistics; its model holds their average). Checkpoints
written before num_samples, global_batch and base_lr were recorded resume as before; only the checks
those fields allow are skipped. ``training_state`` assembles it; ``restore_training_state`` puts it back.
"""
import contextlib
import dataclasses
import glob
import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import paddle

from passl.errors import CheckpointError, WriteError
from passl.utils.fileio import atomic_path

__all__ = ["atomic_save", "load_file", "CheckpointManager", "find_latest", "optimizer_state_by_names",
           "optimizer_state_from_names", "rng_state", "set_rng_state", "Progress",
           "training_state", "check_resumable", "check_mid_epoch_resume", "recorded_lr_scaling",
           "restore_training_state"]

SEP = "/"   # between a structured parameter name and an accumulator suffix


def atomic_save(obj, path):
    """``paddle.save(obj, path)`` through a temporary file in the same directory and a rename; a failed
    write (disk full) raises WriteError naming ``path`` and the bytes it needs."""
    from passl.io import write_paddle
    return write_paddle(obj, path, state_nbytes(obj))


def state_nbytes(obj):
    """Bytes of the tensors and arrays in ``obj`` (nested dicts, lists, tuples): about a checkpoint's size."""
    if isinstance(obj, paddle.Tensor):
        return int(np.prod(obj.shape)) * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def _atomic_link(src, dst):
    """Make ``dst`` a hard link (or, failing that, a copy) of ``src``, atomically."""
    with atomic_path(dst) as tmp:
        os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def load_file(path):
    """Read a checkpoint or weights file without running code from it (passl.io): a Paddle pickle
    comes back as ``paddle.load`` gave it (tensors as paddle Tensors, generator states as Paddle's);
    other formats with numpy arrays. CheckpointError names the file when it cannot be read."""
    from passl.io import read_state
    return read_state(path, to_paddle=True)


def find_latest(output_dir):
    """The newest checkpoint in ``output_dir`` (for ``--resume`` without a path)."""
    path = os.path.join(output_dir, "latest.pdckpt")
    if os.path.isfile(path):
        return path
    epochs = sorted(glob.glob(os.path.join(output_dir, "epoch_*.pdckpt")))
    if epochs:
        return epochs[-1]
    raise CheckpointError(f"--resume: no checkpoint in {output_dir} (looked for latest.pdckpt and "
                          "epoch_*.pdckpt); pass the checkpoint path, or start without --resume")


class CheckpointManager:
    """Writes checkpoints into ``output_dir``; only call it on the process that writes files."""

    def __init__(self, output_dir, keep_last=3):
        self.output_dir, self.keep_last = output_dir, keep_last

    def path(self, name):
        return os.path.join(self.output_dir, name)

    def save_epoch(self, state, epoch, is_best=False, best_weights=None):
        """Save the end of ``epoch`` (1-based count of finished epochs); update latest/best; prune.
        Returns the checkpoint's path (latest.pdckpt when keep_last is 0). A failed write raises
        WriteError saying which checkpoint the run can continue from."""
        with self._explained(f"the checkpoint of epoch {epoch}"):
            path = atomic_save(state, self.path(f"epoch_{epoch:04d}.pdckpt"))
            _atomic_link(path, self.path("latest.pdckpt"))
        if is_best:
            with self._explained(f"the best weights of epoch {epoch}", saved=True):
                _atomic_link(path, self.path("best.pdckpt"))
                if best_weights is not None:
                    atomic_save(best_weights, self.path("best_model.pdparams"))
                    _save_safetensors(best_weights, self.path("best_model.safetensors"), state, epoch)
        self._prune()
        return path if os.path.exists(path) else self.path("latest.pdckpt")

    def save_latest(self, state):
        """Save a mid-epoch state (interrupt) as latest only."""
        with self._explained("the interrupted epoch"):
            return atomic_save(state, self.path("latest.pdckpt"))

    @contextlib.contextmanager
    def _explained(self, what, saved=False):
        """A failed write (WriteError: disk full, ...) also says what was not saved and where the run can
        continue from; ``saved``: latest.pdckpt already holds this epoch."""
        try:
            yield
        except WriteError as e:
            latest = self.path("latest.pdckpt")
            if saved:
                kept = f"{latest} holds this epoch: continue from it with --resume"
            elif os.path.exists(latest):
                kept = f"{latest}, saved before, is intact: continue from it with --resume"
            else:
                kept = "no checkpoint of this run was saved yet"
            raise WriteError(f"{e}; the run stopped without saving {what}: {kept}") from None

    def _prune(self):
        files = sorted(glob.glob(self.path("epoch_*.pdckpt")),
                       key=lambda p: int(re.search(r"epoch_(\d+)", p).group(1)))
        for old in files[:max(len(files) - self.keep_last, 0)]:
            os.remove(old)   # latest/best are separate links and survive


def _save_safetensors(weights, path, state, epoch):
    """The best weights as .safetensors, described by the run's model config and epoch."""
    from passl.io import write_safetensors
    from passl.models.convert import weights_metadata
    config = state.get("config") if isinstance(state, dict) else None
    best = (state.get("best") or {}) if isinstance(state, dict) else {}
    meta = weights_metadata(weights, (config or {}).get("model"), epoch=epoch, which=best.get("which", "model"))
    if isinstance(state, dict) and state.get("classes"):
        meta["classes"] = json.dumps(state["classes"])
    write_safetensors(weights, path, meta)


# ---------------------------------------------------------------------------------------------
# optimizer state by structured names

def _internal_to_structured(model):
    return {p.name: n for n, p in model.named_parameters()}


def optimizer_state_by_names(optimizer, model):
    """``optimizer.state_dict()`` with Paddle's internal tensor names replaced by structured names."""
    mapping = _internal_to_structured(model)
    internal = sorted(mapping, key=len, reverse=True)
    out = {}
    for key, value in optimizer.state_dict().items():
        if key == "master_weights":
            out[key] = {mapping.get(k, k): v for k, v in value.items()}
            continue
        owner = next((n for n in internal if key.startswith(n + "_")), None)
        out[key if owner is None else mapping[owner] + SEP + key[len(owner) + 1:]] = value
    return out


def optimizer_state_from_names(state, model):
    """Inverse of ``optimizer_state_by_names`` for this process's ``model``."""
    mapping = {n: p.name for n, p in model.named_parameters()}
    out = {}
    for key, value in state.items():
        if key == "master_weights":
            out[key] = {mapping.get(k, k): v for k, v in value.items()}
            continue
        name, sep, suffix = key.partition(SEP)
        if sep and name not in mapping:
            raise CheckpointError(f"optimizer state names parameter '{name}', which this model lacks; "
                                  "was the checkpoint written for another model config?")
        out[mapping[name] + "_" + suffix if sep else key] = value
    return out


# ---------------------------------------------------------------------------------------------
# random number generators

def rng_state():
    """Paddle (CPU and, if any, current GPU), NumPy and Python generator states."""
    state = {"paddle": paddle.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        state["cuda"] = paddle.get_cuda_rng_state()
    return state


def set_rng_state(state):
    paddle.set_rng_state(state["paddle"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        paddle.set_cuda_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# the training state: what a checkpoint holds and how a run continues from it

@dataclasses.dataclass
class Progress:
    """Where a run stands. ``epoch``: finished epochs; ``batch``: micro-batches done in the current
    one (non-zero only in a mid-epoch checkpoint); epoch and batch are all the lr schedule needs
    (optim.epoch_progress); ``global_step``: optimizer steps so far (the model's random stream per
    step, the logs); ``best``: {'top1', 'which' ('model' | 'ema'), 'epoch'} or None."""
    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best: Optional[dict] = None


def training_state(model, optimizer_step, ema, progress, cfg, world_size, classes=None, num_samples=None,
                   global_batch=None, base_lr=None):
    """The checkpoint dict of a run: ``model`` unwrapped, ``optimizer_step`` an OptimizerStep,
    ``ema`` a ModelEma or None, ``progress`` a Progress, ``cfg`` the resolved config, ``classes`` the
    training set's class names in label order (evaluation checks its folders against them),
    ``num_samples`` the training set's size, ``global_batch`` images per optimizer step over all
    processes and ``base_lr`` the lr scaled to it (a resume with another global batch logs both)."""
    scaler = optimizer_step.scaler
    return {
        "model": model.state_dict(),
        "optimizer": optimizer_state_by_names(optimizer_step.optimizer, model),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "epoch": progress.epoch, "batch": progress.batch,
        "global_step": progress.global_step, "best": progress.best,
        "sampler": {"epoch": progress.epoch, "batch": progress.batch, "seed": cfg["seed"],
                    "world_size": world_size, "batch_size": cfg["data"]["train"]["batch_size"],
                    "num_samples": num_samples, "global_batch": global_batch},
        "base_lr": base_lr, "rng": rng_state(), "config": cfg, "classes": classes,
    }


def check_resumable(ckpt, path, world_size, batch_size):
    """Raise CheckpointError unless ``ckpt`` is a training checkpoint this run can continue:
    a mid-epoch position only means the same thing with the same processes x per-process batch."""
    for key in ("model", "optimizer", "epoch", "batch", "global_step"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: not a training checkpoint (no '{key}'); use --load for weights")
    sampler = ckpt.get("sampler", {})
    if ckpt["batch"] and (sampler.get("world_size"), sampler.get("batch_size")) != (world_size, batch_size):
        raise CheckpointError(f"{path} stopped mid-epoch with {sampler.get('world_size')} processes x batch "
                              f"{sampler.get('batch_size')}; resume it with the same, or from an epoch checkpoint")


def check_mid_epoch_resume(ckpt, path, num_samples, global_batch):
    """Raise CheckpointError when ``ckpt`` stopped mid-epoch and this run's training set (``num_samples``
    images) or global batch (accumulation included) differs from the one it recorded: its position in
    the epoch would mean other samples, and the epoch would end early or late. Returns a warning (str)
    when the checkpoint predates these records and they cannot be checked, else None."""
    if not ckpt["batch"]:
        return None      # an epoch boundary: any data and batch continue from there
    sampler = ckpt.get("sampler") or {}
    recorded_samples, recorded_batch = sampler.get("num_samples"), sampler.get("global_batch")
    if recorded_samples is not None and recorded_samples != num_samples:
        raise CheckpointError(f"{path} stopped mid-epoch ({ckpt['batch']} batches into epoch {ckpt['epoch'] + 1}) on "
                              f"a training set of {recorded_samples} images, but data.train.dataset now has "
                              f"{num_samples}: its position in the epoch would mean other images. Resume on the "
                              "same training set, or from an epoch checkpoint (epoch_*.pdckpt) of that run")
    if recorded_batch is not None and recorded_batch != global_batch:
        raise CheckpointError(f"{path} stopped mid-epoch with a global batch of {recorded_batch}, this run has "
                              f"{global_batch} (train.accum_steps changed?); resume it with the same, or from an "
                              "epoch checkpoint")
    if recorded_samples is None:
        return (f"{path} does not record its training set's size: resuming mid-epoch assumes data.train.dataset "
                "is unchanged")
    return None


def recorded_lr_scaling(ckpt):
    """(global batch, base lr) the run of ``ckpt`` trained with; None for what it does not record
    (the global batch of an older checkpoint is worked out from its sampler and config)."""
    sampler = ckpt.get("sampler") or {}
    global_batch = sampler.get("global_batch")
    if global_batch is None and sampler.get("world_size") and sampler.get("batch_size"):
        accum = ((ckpt.get("config") or {}).get("train") or {}).get("accum_steps", 1)
        global_batch = sampler["world_size"] * sampler["batch_size"] * accum
    return global_batch, ckpt.get("base_lr")


def restore_training_state(ckpt, path, model, optimizer_step, ema):
    """Load a checked ``ckpt`` (see check_resumable) into the freshly built run; returns its Progress.

    An EMA the checkpoint lacks starts from the restored model weights. The random generators are
    restored last, so the run continues their streams exactly.
    """
    missing, unexpected = model.set_state_dict(ckpt["model"])
    if missing or unexpected:
        raise CheckpointError(f"{path}: model keys do not match the config's model: missing {missing}, "
                              f"unexpected {unexpected}")
    optimizer_step.optimizer.set_state_dict(optimizer_state_from_names(ckpt["optimizer"], model))
    if optimizer_step.scaler is not None and ckpt.get("scaler"):
        optimizer_step.scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        ema.set_state_dict(ckpt.get("ema") or model.state_dict())
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    return Progress(**{k: ckpt.get(k) for k in ("epoch", "batch", "global_step", "best")})
