"""Building a run from its resolved config (``passl.config.load_config``).

``start_session`` places this process in the run (rank, device, logger, process group);
``build_run`` builds everything the training loop uses into a plain ``Run`` object:
the model, its loaders, loss, optimizer step, lr schedule, EMA, and where the run stands
(fresh, from ``--load`` weights, or continuing a checkpoint).
"""
import dataclasses
import logging
import os
from typing import Callable, Optional

import paddle
from paddle.base import unique_name

import passl
from passl.config import dump_config
from passl.data import build_dataset, collate_fn
from passl.data.datasets import check_same_classes
from passl.data.loader import Loader, build_loader
from passl.engine.amp import AmpSettings, resolve_amp
from passl.engine.checkpoint import (CheckpointManager, Progress, check_mid_epoch_resume, check_resumable,
                                     find_latest, load_file, recorded_lr_scaling, restore_training_state,
                                     training_state)
from passl.engine.ema import ModelEma
from passl.engine.guards import RunFlags, check_disk
from passl.engine.logging import MetricsWriter, setup_logger
from passl.engine.optim import build_lr_schedule, build_optimizer, epoch_progress
from passl.engine.step import NormStatistics, OptimizerStep
from passl.errors import ConfigError
from passl.utils import distributed as du
from passl.utils.fileio import ensure_writable_dir

__all__ = ["Session", "start_session", "build_model", "build_split_loader", "Run", "build_run"]


@dataclasses.dataclass
class Session:
    """This process in the run: the config, its rank among ``world_size`` processes, device, logger."""
    cfg: dict
    rank: int
    world_size: int
    device: str
    log: logging.Logger

    @property
    def main(self):
        """The process that writes files and prints progress."""
        return self.rank == 0

    @property
    def output_dir(self):
        return self.cfg["output_dir"]

    def use_output_dir(self):
        """Create output_dir, prove it writable and log into its train.log (main process). Whether a
        training run may write there is guards.claim_output_dir's to say."""
        if self.main:
            ensure_writable_dir(self.output_dir, "output_dir", "-o output_dir=...")
            setup_logger(self.output_dir, True)


def start_session(cfg):
    """Logger, device and (with several processes) the process group for ``cfg``. Only the main
    process logs below WARNING, so ``session.log.info`` may be called on every rank."""
    rank = du.rank()
    log = setup_logger(None, rank == 0)
    device = du.select_device(cfg["device"], log=log.info if rank == 0 else None)
    du.init_distributed()
    return Session(cfg, rank, du.world_size(), device, log)


def build_model(cfg):
    """The ``model:`` section's model, with the same internal names in every process and run."""
    with unique_name.guard():
        return passl.build_model(cfg["model"])


def build_split_loader(session, split, model):
    """The Loader of ``data.<split>`` for ``model``'s classes, token grid and image size; None
    when the config has no dataset for that split."""
    split_cfg = session.cfg["data"][split]
    if split_cfg.get("dataset") is None:
        return None
    dataset = build_dataset(split_cfg, split, model.num_classes, tuple(model.grid_size),
                            getattr(model, "img_size", None), cache_dir=session.output_dir)
    return build_loader(dataset, split_cfg, collate_fn, train=split == "train",
                        seed=session.cfg["seed"], rank=session.rank, world_size=session.world_size)


def _load_weights(model, path, reinit_head, log):
    """Load initial weights from ``path`` (any format load_pretrained reads; from a .pdckpt, the EMA or
    model weights its ``best`` record names). Returns load_pretrained's report (which: 'weights',
    'model' or 'ema'; classes: the training classes the file records, or None)."""
    from passl.models import load_pretrained
    return load_pretrained(model, path, allow_new_head=reinit_head, log=log)


@dataclasses.dataclass
class Run:
    """Everything ``fit`` uses; built by ``build_run``."""
    session: Session
    model: paddle.nn.Layer          # what the loop calls: DataParallel-wrapped with several processes
    raw_model: paddle.nn.Layer      # the model itself (cast to float16/bfloat16 under AMP O2)
    loss_fn: Callable               # (model outputs, batch) -> {'loss': 0-d tensor, other terms}
    optimizer_step: OptimizerStep
    schedule: Callable              # training progress in epochs -> lr (optim.epoch_progress)
    ema: Optional[ModelEma]
    amp: AmpSettings
    train_loader: Loader
    val_loader: Optional[Loader]
    steps_per_epoch: int
    global_batch: int               # images per optimizer step over all processes
    progress: Progress
    flags: RunFlags
    checkpoints: CheckpointManager  # writes files on the main process only
    metrics: MetricsWriter

    @property
    def cfg(self):
        return self.session.cfg

    @property
    def log(self):
        return self.session.log

    def datasets(self):
        """{split: dataset} of the loaders built."""
        return {split: loader.dataset for split, loader in (("train", self.train_loader), ("val", self.val_loader))
                if loader is not None}

    def lr(self, epoch, step_in_epoch):
        """The lr of optimizer step ``step_in_epoch`` (0-based) of epoch ``epoch`` (0-based)."""
        return self.schedule(epoch_progress(epoch, step_in_epoch, self.steps_per_epoch))

    def state(self):
        """The checkpoint dict of the run as it stands."""
        return training_state(self.raw_model, self.optimizer_step, self.ema, self.progress, self.cfg,
                              self.session.world_size, classes=list(self.train_loader.dataset.source.classes),
                              num_samples=len(self.train_loader.dataset), global_batch=self.global_batch,
                              base_lr=self.schedule.base_lr)


def build_run(session, load=None, resume=None):
    """Build the run of ``session.cfg``: fresh, from the weights file ``load``, or continuing the
    checkpoint ``resume`` (a path, or 'auto': the newest in output_dir), which wins over ``load``."""
    cfg, log = session.cfg, session.log
    session.use_output_dir()
    resume = find_latest(session.output_dir) if resume == "auto" else resume
    ckpt = load_file(resume) if resume else None
    if ckpt is not None:
        check_resumable(ckpt, resume, session.world_size, cfg["data"]["train"]["batch_size"])
        _check_epochs_left(ckpt, resume, cfg["epochs"])
    paddle.seed(cfg["seed"])                     # identical initial weights on every rank
    model = build_model(cfg)
    check_disk(session.output_dir, model, cfg["ema"]["enable"], cfg["train"]["keep_last"], session.main)
    train_loader, val_loader = _build_loaders(session, model)
    load = load or cfg["train"].get("load")
    if ckpt is None and load:
        _load_weights(model, load, cfg["train"]["reinit_head"], log.info)
    if cfg["model"].get("sync_bn"):      # before the EMA copies the model
        model = du.convert_sync_batchnorm(model, session.device, log=log.info)
    amp = resolve_amp(cfg["amp"], session.device, log=log.info, warn=log.warning if session.main else None)
    ema = ModelEma(model, cfg["ema"]["decay"]) if cfg["ema"]["enable"] else None   # from the starting weights
    accum = cfg["train"]["accum_steps"]
    global_batch = cfg["data"]["train"]["batch_size"] * session.world_size * accum
    optimizer, base_lr = build_optimizer(cfg["optimizer"], model, global_batch, cfg["train"]["grad_clip"],
                                         multi_precision=amp.enabled and amp.level == "O2", log=log.info)
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch <= 0:
        raise ConfigError(f"the training set ({len(train_loader.dataset)} images) gives no full batch per epoch "
                          f"with {session.world_size} process(es) x batch {cfg['data']['train']['batch_size']} x "
                          f"{accum} accumulation; lower data.train.batch_size or train.accum_steps")
    schedule = build_lr_schedule(cfg["lr_schedule"], base_lr, cfg["epochs"])
    optimizer_step = OptimizerStep(optimizer, amp.scaler, accum)
    if amp.scaler is not None:           # a skipped step leaves the BN statistics as they were
        optimizer_step.norm_statistics = NormStatistics(model)
    model, optimizer_step.optimizer = amp.decorate(model, optimizer)
    progress = Progress()
    if ckpt is not None:      # into the decorated model and optimizer: see restore_training_state
        warning = check_mid_epoch_resume(ckpt, resume, len(train_loader.dataset), global_batch)
        if warning:
            log.warning(warning)
        progress = restore_training_state(ckpt, resume, model, optimizer_step, ema, log=log.warning)
        log.info(f"resumed {resume}: epoch {progress.epoch} batch {progress.batch} step {progress.global_step}")
        _log_lr_scaling(ckpt, global_batch, base_lr, progress, steps_per_epoch, log.info)
    run = Run(
        session=session, model=paddle.DataParallel(model) if session.world_size > 1 else model, raw_model=model,
        loss_fn=passl.build_loss(cfg["loss"]), optimizer_step=optimizer_step, schedule=schedule, ema=ema, amp=amp,
        train_loader=train_loader, val_loader=val_loader, steps_per_epoch=steps_per_epoch,
        global_batch=global_batch, progress=progress,
        flags=RunFlags(cfg["amp"]["max_nonfinite_steps"] if amp.scaler is not None else 1),
        checkpoints=CheckpointManager(session.output_dir, cfg["train"]["keep_last"]),
        metrics=MetricsWriter(session.output_dir, enabled=session.main))
    if ckpt is not None:      # after DataParallel, which gives every rank rank 0's buffers
        _restore_own_bn_statistics(ckpt, session, model, ema)
    if session.main:
        dump_config(cfg, os.path.join(session.output_dir, "config.yaml"))
    log.info(_describe(run))
    return run


def _restore_own_bn_statistics(ckpt, session, model, ema):
    """A mid-epoch checkpoint of several processes keeps every rank's own BatchNorm statistics
    (trainer._settle_bn_statistics; its model holds their average): give this rank its own back."""
    per_rank = ckpt.get("bn_by_rank")
    if not ckpt["batch"] or not per_rank or len(per_rank) != session.world_size:
        return
    own = per_rank[session.rank]
    for module, values in ((model, own.get("model")), (ema.module if ema is not None else None, own.get("ema"))):
        if module is None or not values:
            continue
        stats = du.bn_statistics(module)
        for name, value in values.items():
            stats[name].set_value(paddle.to_tensor(value).astype(stats[name].dtype))


def _log_lr_scaling(ckpt, global_batch, base_lr, progress, steps_per_epoch, log):
    """Say so when a resumed run has another global batch than the checkpoint's: the lr is scaled anew,
    and the schedule continues from the same point in epochs."""
    old_batch, old_lr = recorded_lr_scaling(ckpt)
    if old_batch is None or old_batch == global_batch:
        return
    was = f" (was {old_lr:.4g})" if old_lr is not None else ""
    log(f"the global batch changed from {old_batch} to {global_batch}: lr scaled to {base_lr:.4g}{was}; the lr "
        f"schedule continues from the end of epoch {progress.epoch} ({steps_per_epoch} steps/epoch now)")


def _check_epochs_left(ckpt, path, epochs):
    """A checkpoint that has finished ``epochs`` or more has nothing left to train."""
    if ckpt["epoch"] >= epochs:
        raise ConfigError(f"--resume {path}: that run has finished {ckpt['epoch']} epochs and epochs is {epochs}; "
                          f"nothing is left to train. Set a larger epochs (e.g. -o epochs={ckpt['epoch'] + 10}) to "
                          "train further")


def _build_loaders(session, model):
    """The train loader and the val loader (None without validation data), with the same classes."""
    train_loader = build_split_loader(session, "train", model)
    if train_loader is None:
        raise ConfigError("data.train.dataset is not set; add it to the config (see configs/lvvit/)")
    val_loader = build_split_loader(session, "val", model)
    if val_loader is not None:
        train, val = train_loader.dataset.source, val_loader.dataset.source
        check_same_classes(val.classes, train.classes, f"data.val.dataset ({val.root})",
                           f"data.train.dataset ({train.root})",
                           "make the class folders match, or give both datasets the same class_names list "
                           "(a class missing from the validation set is then fine)")
    return train_loader, val_loader


def _describe(run):
    """The run's first log line: processes, precision, batch arithmetic, length, seeds."""
    cfg, session, accum = run.cfg, run.session, run.optimizer_step.accum_steps
    return (f"{session.world_size} process(es) on {session.device}, {run.amp.describe()}; global batch "
            f"{run.global_batch} ({cfg['data']['train']['batch_size']} x {session.world_size} processes x "
            f"{accum} accumulation); {run.steps_per_epoch} steps/epoch x {cfg['epochs']} epochs; "
            f"{len(run.train_loader.dataset)} training images; seed {cfg['seed']}: model stream per step = "
            "SeedSequence([seed, rank, step, 7]), samples reseeded from SeedSequence([seed, epoch, position]), "
            "workers from SeedSequence([seed, epoch, rank, worker, 1])")
