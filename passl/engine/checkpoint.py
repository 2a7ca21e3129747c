"""Checkpoints: atomic writes, latest/best/epoch files, and a resume that loses nothing.

Layout of ``output_dir``:
    epoch_0007.pdckpt   end of epoch 7 (the last ``keep_last`` are kept)
    latest.pdckpt       the newest state, end of epoch or mid-epoch (Ctrl-C)
    best.pdckpt         the epoch whose model or EMA scored the best top-1
    best_model.pdparams just the best weights (model or EMA, whichever won), for --load / export
    best_model.safetensors  the same weights as .safetensors (variant, img_size, epoch in its metadata)

A checkpoint is a dict: model, optimizer (keyed by structured parameter names, so it does not
depend on Paddle's internal tensor names), scaler, ema, epoch, batch (position in that epoch),
global_step, rng (paddle, numpy, python), best, config.
"""
import glob
import os
import random
import re
import shutil

import numpy as np
import paddle

from passl.errors import CheckpointError
from passl.utils.fileio import atomic_path

__all__ = ["atomic_save", "load_file", "CheckpointManager", "find_latest", "optimizer_state_by_names",
           "optimizer_state_from_names", "rng_state", "set_rng_state", "weights_from"]

SEP = "/"   # between a structured parameter name and an accumulator suffix


def atomic_save(obj, path):
    """``paddle.save(obj, path)`` through a temporary file in the same directory and a rename."""
    from passl.io import write_paddle
    return write_paddle(obj, path)


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
        """Save the end of ``epoch`` (1-based count of finished epochs); update latest/best; prune."""
        path = atomic_save(state, self.path(f"epoch_{epoch:04d}.pdckpt"))
        _atomic_link(path, self.path("latest.pdckpt"))
        if is_best:
            _atomic_link(path, self.path("best.pdckpt"))
            if best_weights is not None:
                atomic_save(best_weights, self.path("best_model.pdparams"))
                _save_safetensors(best_weights, self.path("best_model.safetensors"), state, epoch)
        self._prune()
        return path

    def save_latest(self, state):
        """Save a mid-epoch state (interrupt) as latest only."""
        return atomic_save(state, self.path("latest.pdckpt"))

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


def weights_from(obj, path="weights"):
    """Model weights from a loaded file: a checkpoint gives its best weights, a state dict itself.

    Returns ``(state_dict, which)``, ``which`` being 'model', 'ema' or 'weights'.
    """
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        which = (obj.get("best") or {}).get("which", "model")
        if which == "ema" and obj.get("ema"):
            return obj["ema"], "ema"
        return obj["model"], "model"
    if isinstance(obj, dict):
        return obj, "weights"
    raise CheckpointError(f"{path}: expected a state dict or a checkpoint, got {type(obj).__name__}")
