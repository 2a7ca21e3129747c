"""Checkpoints: atomic writes, latest/best/epoch files, and a resume that loses nothing.

Layout of ``output_dir``:
    epoch_0007.pdckpt   end of epoch 7 (the last ``keep_last`` are kept)
    latest.pdckpt       the newest state, end of epoch or mid-epoch (Ctrl-C)
    best.pdckpt         the epoch whose model or EMA scored the best top-1
    best_model.pdparams just the best weights (model or EMA, whichever won), for --load / export
    best_model.safetensors  the same weights as .safetensors (variant, img_size, epoch in its metadata)

A checkpoint is a dict: model (float32 weights whatever the AMP level), optimizer (keyed by
structured parameter names, so it does not depend on Paddle's internal tensor names or the AMP level),
scaler, ema, epoch, batch (position in that epoch), global_step, best, sampler (what the position
means: world_size, batch_size, seed, num_samples: the training set's size, global_batch: images per
optimizer step), base_lr (the lr scaled to that global batch), rng (see rng_state), config, and in a
mid-epoch checkpoint of several processes bn_by_rank (each rank's own BatchNorm statistics; its model
holds their average). Checkpoints written before num_samples, global_batch and base_lr were recorded
resume as before; only the checks those fields allow are skipped. ``training_state`` assembles it;
``restore_training_state`` puts it back.
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
           "float32_weights", "cast_like", "legacy_master_weights",
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

# Under AMP O2 with master weights Paddle's optimizer keeps a float32 copy of every float16/bfloat16
# parameter, named "<param>_fp32_master_0" (optimizer.py _create_master_weight and
# _gen_master_weight_var_name; OptimizerStep's private name generator keeps the 0), and names that
# parameter's accumulators after the copy: "<param>_fp32_master_0_moment1_0". Checkpoints store them
# under the parameter's own suffix ("<structured name>/moment1_0"), so a state resumes at any AMP level.
MASTER = "_fp32_master_0"
_MASTER_SUFFIX = re.compile(r"^fp32_master_\d+_")


def _internal_to_structured(model):
    return {p.name: n for n, p in model.named_parameters()}


def optimizer_state_by_names(optimizer, model):
    """``optimizer.state_dict()`` with Paddle's internal tensor names replaced by structured names and
    accumulator suffixes that do not depend on the AMP level. The float32 master weights of AMP O2 are
    left out: ``float32_weights`` puts them in the checkpoint's model weights."""
    mapping = _internal_to_structured(model)
    internal = sorted(mapping, key=len, reverse=True)
    out = {}
    for key, value in optimizer.state_dict().items():
        if key == "master_weights":
            continue
        owner = next((n for n in internal if key.startswith(n + "_")), None)
        if owner is None:
            out[key] = value
        else:
            out[mapping[owner] + SEP + _MASTER_SUFFIX.sub("", key[len(owner) + 1:])] = value
    return out


def optimizer_state_from_names(state, model, masters=()):
    """Inverse of ``optimizer_state_by_names`` for this process's ``model``; the parameters named in
    ``masters`` (structured names) get the accumulator names of an O2 master weight."""
    mapping = {n: p.name for n, p in model.named_parameters()}
    out = {}
    for key, value in state.items():
        if key == "master_weights":          # written by earlier versions: see legacy_master_weights
            continue
        name, sep, suffix = key.partition(SEP)
        if sep and name not in mapping:
            raise CheckpointError(f"optimizer state names parameter '{name}', which this model lacks; "
                                  "was the checkpoint written for another model config?")
        if not sep:
            out[key] = value
            continue
        suffix = _MASTER_SUFFIX.sub("", suffix)
        out[mapping[name] + (MASTER if name in masters else "") + "_" + suffix] = value
    return out


def legacy_master_weights(optimizer_state):
    """{structured name: float32 tensor} of the master weights an older checkpoint kept in its optimizer
    state (its model weights were then float16/bfloat16); {} for a checkpoint of this version."""
    return dict(optimizer_state.get("master_weights") or {})


# ---------------------------------------------------------------------------------------------
# weights in float32 whatever the AMP level

_HALF = ("float16", "bfloat16")


def _dtype_name(tensor):
    return str(tensor.dtype).replace("paddle.", "")


def float32_weights(model, optimizer=None):
    """``model.state_dict()`` with every float16/bfloat16 entry in float32: the optimizer's float32
    master weight where AMP O2 keeps one (``optimizer._master_weights``, {parameter name: tensor},
    paddle/optimizer/optimizer.py ``_create_master_weight``), else the entry cast up. Under O1 or
    without AMP the state dict itself (no copies)."""
    masters = getattr(optimizer, "_master_weights", None) or {}
    out = {}
    for key, value in model.state_dict().items():
        if _dtype_name(value) in _HALF:
            master = masters.get(value.name)
            value = master if master is not None else value.astype("float32")
        out[key] = value
    return out


def cast_like(weights, targets):
    """``weights`` with each floating entry cast to the dtype of the same key in ``targets`` (a state
    dict): Paddle's ``set_state_dict`` refuses a dtype mismatch (float32 weights into an O2 model's
    float16 parameters, or the float16 weights of an older O2 checkpoint into a float32 model)."""
    out = {}
    for key, value in weights.items():
        target = targets.get(key)
        if (target is not None and isinstance(value, paddle.Tensor) and paddle.is_floating_point(value)
                and value.dtype != target.dtype):
            value = value.astype(target.dtype)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# random number generators

def rng_state():
    """The generators a process draws from: Paddle's CPU generator and, on a GPU, the generator of this
    process's own device (not the list of every visible device ``paddle.get_rng_state()`` gives on a
    GPU), NumPy's and Python's."""
    state = {"paddle_cpu": paddle.get_rng_state("cpu")[0], "numpy": np.random.get_state(),
             "python": random.getstate()}
    device = paddle.device.get_device()            # 'cpu' or 'gpu:3'
    if device.startswith("gpu:"):
        index = int(device.split(":")[1])
        state["paddle_device"] = {"device": device, "state": paddle.get_rng_state("gpu")[index]}
    return state


def set_rng_state(state, log=None):
    """Restore what ``rng_state`` saved where it means something here: NumPy, Python and Paddle's CPU
    generator always; the device generator only on a GPU, into this process's device. Paddle's
    ``set_rng_state`` raises when the list it gets has not one state per visible device
    (paddle/framework/random.py, set_rng_state), so a checkpoint of 8 GPUs would not resume on 4, 1 or
    the CPU; the model stream is reseeded at every step anyway (trainer.step_seed), so nothing depends on
    the device generator's state across a resume. Older checkpoints (``paddle``: the list of the saving
    process's current device, ``cuda``: every GPU's) give their CPU entry, or their own device's entry
    when the device counts match. ``log`` hears what was not restored."""
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cpu, device = state.get("paddle_cpu"), state.get("paddle_device")
    if "paddle_cpu" not in state:                  # the older layout
        listed = list(state.get("paddle") or ())
        cpu = listed[0] if len(listed) == 1 and "cuda" not in state else None
        device = {"device": "gpu", "list": list(state.get("cuda") or ())} if "cuda" in state else None
    if cpu is not None:
        paddle.set_rng_state([cpu], "cpu")
    here = paddle.device.get_device()
    if device is None or not here.startswith("gpu:"):
        return
    index = int(here.split(":")[1])
    states = paddle.get_rng_state("gpu")
    if "list" in device:
        if len(device["list"]) != len(states):
            if log:
                log(f"the checkpoint's GPU random state lists {len(device['list'])} devices and this process "
                    f"sees {len(states)}: the GPU generator is not restored (the model stream is reseeded "
                    "every step)")
            return
        states[index] = device["list"][index]
    else:
        states[index] = device["state"]
    paddle.set_rng_state(states, "gpu")


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
        "model": float32_weights(model, optimizer_step.optimizer),
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


def restore_training_state(ckpt, path, model, optimizer_step, ema, log=None):
    """Load a checked ``ckpt`` (see check_resumable) into the freshly built run; returns its Progress.

    ``model`` and ``optimizer_step`` are as the run trains them: under AMP O2 already decorated
    (float16/bfloat16 parameters, an optimizer with master weights). The checkpoint's float32 weights
    are cast to each parameter's dtype and become the O2 master weights, so a checkpoint resumes at any
    AMP level (O1, O2, off) whatever level wrote it. An EMA the checkpoint lacks starts from the restored
    float32 weights. The random generators are restored last (see set_rng_state; ``log`` hears what is not).
    """
    weights = dict(ckpt["model"])
    weights.update(legacy_master_weights(ckpt["optimizer"]))
    missing, unexpected = model.set_state_dict(cast_like(weights, model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"{path}: model keys do not match the config's model: missing {missing}, "
                              f"unexpected {unexpected}")
    optimizer = optimizer_step.optimizer
    masters = _master_weights(optimizer, model, weights)
    state = optimizer_state_from_names(ckpt["optimizer"], model, masters={n for n, _ in masters})
    if masters:
        state["master_weights"] = dict(masters_by_internal for _, masters_by_internal in masters)
    optimizer.set_state_dict(state)
    if optimizer_step.scaler is not None and ckpt.get("scaler"):
        optimizer_step.scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        ema.set_state_dict(ckpt.get("ema") or weights)
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"], log)
    return Progress(**{k: ckpt.get(k) for k in ("epoch", "batch", "global_step", "best")})


def _master_weights(optimizer, model, weights):
    """[(structured name, (parameter name, float32 tensor))] for the parameters an O2 optimizer keeps a
    master weight of (float16/bfloat16 parameters of a multi-precision optimizer, adamw.py
    _create_accumulators). Set before the first step, ``_create_master_weight`` uses them instead of
    casting the half-precision parameter up (optimizer.py: ``if param.name in self._master_weights``),
    so the run continues from the exact float32 weights."""
    if not getattr(optimizer, "_multi_precision", False):
        return []
    out = []
    for name, param in model.named_parameters():
        if _dtype_name(param) in _HALF:
            master = paddle.to_tensor(weights[name], dtype="float32")    # a copy on this device
            master.name = param.name + MASTER
            out.append((name, (param.name, master)))
    return out
