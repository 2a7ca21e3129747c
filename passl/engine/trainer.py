"""The training loop: one process or many (paddle.distributed.launch), exact resume, exact evaluation.

Reading order: ``Trainer.train`` sets everything up (``_setup``), then runs ``_train_epoch`` per
epoch, evaluates, and checkpoints; ``evaluate_only`` needs nothing but the validation data.
Randomness in the model (MixToken, drop path) is reseeded at every optimizer step from
(seed, rank, step), and data augmentation per sample (passl.data.loader), so a resumed run
repeats the uninterrupted one exactly and every rank has its own recorded stream.
"""
import contextlib
import json
import os
import shutil
import signal
import time

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.base import unique_name

from passl.data.loader import build_loader
from passl.engine.amp import resolve_amp
from passl.engine.checkpoint import (CheckpointManager, find_latest, load_file, optimizer_state_by_names,
                                     optimizer_state_from_names, rng_state, set_rng_state, weights_from)
from passl.engine.ema import ModelEma
from passl.engine.evaluate import evaluate
from passl.engine.logging import DeviceMeter, MetricsWriter, format_eta, progress_bar, setup_logger
from passl.engine.optim import build_lr_schedule, build_optimizer
from passl.errors import CheckpointError, ConfigError, PasslError
from passl.utils import distributed as du
from passl.utils.fileio import write_text

__all__ = ["Trainer", "step_seed"]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
_NO_BAD_STEP = 2 ** 62
_PEER_LOST = ("TIMEOUT", "Timeout", "timed out", "Connection", "connection", "NCCL", "gloo", "closed")


def step_seed(seed, rank, step):
    """Seed of the Paddle generator for optimizer step ``step`` on ``rank``."""
    return int(np.random.SeedSequence([seed, rank, step, 7]).generate_state(1)[0])


def _unwrap(model):
    return model._layers if isinstance(model, paddle.DataParallel) else model


def _init_distributed():
    if not dist.is_initialized():
        dist.init_parallel_env()


class Trainer:
    """Train or evaluate the model of a resolved config (``passl.config.load_config``)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world_size = du.rank(), du.world_size()
        self.main = self.rank == 0
        self.output_dir = cfg["output_dir"]
        self.log = setup_logger(None, self.main)
        self.device = du.select_device(cfg["device"], log=self.log.info if self.main else None)
        if self.world_size > 1:
            _init_distributed()
        self.stop_requested = False
        self.model = self.ema = None
        self._optimizer_names = unique_name.UniqueNameGenerator()
        self.datasets = {}

    # -----------------------------------------------------------------------------------------
    # public entry points

    def train(self, load=None, resume=None):
        """Train for ``cfg['epochs']`` epochs. ``load``: initial weights; ``resume``: a checkpoint
        path or 'auto' (latest in output_dir). Returns 0, 1 (non-finite loss) or 130 (interrupted)."""
        try:
            return self._train(load, resume)
        except PasslError:
            raise
        except Exception as e:
            if self.world_size > 1:
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                if any(word in str(e) for word in _PEER_LOST):
                    self.log.error(f"rank {self.rank} of {self.world_size}: lost contact with the other processes "
                                   f"({type(e).__name__}: {first_line}); another rank probably died first - its "
                                   "error is in the launcher's log directory (log/workerlog.<rank> by default)")
                else:
                    self.log.error(f"rank {self.rank} of {self.world_size} failed: {type(e).__name__}: {first_line} "
                                   f"(the launcher stops the other ranks; traceback in log/workerlog.{self.rank})")
            raise

    def evaluate_only(self, weights):
        """Evaluate ``weights`` (a .pdparams, a checkpoint, or whatever load_pretrained reads) on
        the validation set only. Prints one line, writes eval.json. Returns 0."""
        self._prepare_output_dir(fresh=False)
        paddle.seed(self.cfg["seed"])
        model = self._build_model()
        which = self._load_weights(model, weights)
        val_loader = self._build_loader("val", model)
        if val_loader is None:
            raise ConfigError("--evaluate-only needs data.val.dataset in the config")
        amp = resolve_amp(self.cfg["amp"], self.device, log=self.log.info)
        start = time.time()
        bar = progress_bar(len(val_loader), "eval", self.main)
        result = evaluate(model, val_loader, amp.autocast, bar)
        if bar is not None:
            bar.close()
        result.update(weights=os.path.abspath(weights), which=which, seconds=round(time.time() - start, 2))
        self.last_eval = result
        self._report_bad_images()
        if self.main:
            write_text(os.path.join(self.output_dir, "eval.json"), json.dumps(result, indent=1))
            print(f"eval {weights} ({which}): top1 {result['top1']:.3f}  top5 {result['top5']:.3f}  on "
                  f"{result['num_samples']} images in {result['seconds']:.1f} s "
                  f"-> {os.path.join(self.output_dir, 'eval.json')}", flush=True)
        return EXIT_OK

    def request_stop(self):
        """Finish the current optimizer step, save a resumable checkpoint, and return 130."""
        self.stop_requested = True

    # -----------------------------------------------------------------------------------------
    # set-up

    def _prepare_output_dir(self, fresh=True):
        """Create output_dir and prove it writable (main process); attach train.log."""
        if not self.main:
            return
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            probe = os.path.join(self.output_dir, f".write_test_{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise PasslError(f"output_dir {self.output_dir} is not writable ({e.strerror}); "
                             "pick another with -o output_dir=...") from None
        self.log = setup_logger(self.output_dir, True)
        if fresh and os.path.exists(os.path.join(self.output_dir, "metrics.jsonl")):
            os.remove(os.path.join(self.output_dir, "metrics.jsonl"))

    def _check_disk(self, model):
        """Refuse to start when output_dir cannot hold two checkpoints and some slack."""
        if not self.main:
            return
        numel = sum(int(np.prod(p.shape)) for p in model.parameters())
        per_checkpoint = numel * 4 * (4 if self.cfg["ema"]["enable"] else 3)   # model, Adam m and v, EMA
        need = 2 * per_checkpoint + (64 << 20)
        free = shutil.disk_usage(self.output_dir).free
        if free < need:
            raise PasslError(f"output_dir {self.output_dir} has {free / 2**30:.2f} GiB free; a checkpoint needs "
                             f"~{per_checkpoint / 2**30:.2f} GiB and two must fit while one is replaced. "
                             "Free some space or choose another output_dir.")

    def _build_model(self):
        import passl
        with paddle.utils.unique_name.guard():   # the same internal names in every process and run
            return passl.build_model(self.cfg["model"])

    def _build_loader(self, split, model):
        import passl.data
        split_cfg = self.cfg["data"][split]
        if split_cfg.get("dataset") is None:
            return None
        dataset = passl.data.build_dataset(split_cfg, split, model.num_classes, tuple(model.grid_size),
                                           model.img_size)
        self.datasets[split] = dataset
        return build_loader(dataset, split_cfg, passl.data.collate_fn, train=split == "train",
                            seed=self.cfg["seed"], rank=self.rank, world_size=self.world_size)

    def _load_weights(self, model, path):
        """Load initial weights; a .pdckpt gives its best weights. Returns which weights were used."""
        from passl.models import load_pretrained
        log = self.log.info if self.main else (lambda *a, **k: None)
        if path.endswith(".pdckpt"):
            state, which = weights_from(load_file(path), path)
            load_pretrained(model, state, allow_new_head=self.cfg["train"]["reinit_head"], log=log)
            return which
        load_pretrained(model, path, allow_new_head=self.cfg["train"]["reinit_head"], log=log)
        return "weights"

    def _setup(self, load, resume):
        cfg, tcfg = self.cfg, self.cfg["train"]
        self._prepare_output_dir(fresh=not resume)
        if resume == "auto":
            resume = find_latest(self.output_dir)
        ckpt = load_file(resume) if resume else None
        seed = cfg["seed"]
        paddle.seed(seed)                     # identical initial weights on every rank
        self.datasets = {}
        model = self._build_model()
        self._check_disk(model)
        self.train_loader = self._build_loader("train", model)
        if self.train_loader is None:
            raise ConfigError("data.train.dataset is not set; add it to the config (see configs/lvvit/)")
        self.val_loader = self._build_loader("val", model)
        accum = tcfg["accum_steps"]
        if accum < 1:
            raise ConfigError(f"train.accum_steps must be >= 1, got {accum}")
        self.steps_per_epoch = len(self.train_loader) // accum
        self.global_batch = cfg["data"]["train"]["batch_size"] * self.world_size * accum
        self.amp = resolve_amp(cfg["amp"], self.device, log=self.log.info)
        self.ema = ModelEma(model, cfg["ema"]["decay"]) if cfg["ema"]["enable"] else None
        optimizer, self.base_lr = build_optimizer(cfg["optimizer"], model, self.global_batch, tcfg["grad_clip"],
                                                  multi_precision=self.amp.enabled and self.amp.level == "O2",
                                                  log=self.log.info)
        self.schedule = build_lr_schedule(cfg["lr_schedule"], self.base_lr, cfg["epochs"], self.steps_per_epoch)
        import passl
        self.loss_fn = passl.build_loss(cfg["loss"])
        self.progress = {"epoch": 0, "batch": 0, "global_step": 0, "best": None}
        if ckpt is not None:
            self._restore(ckpt, resume, model, optimizer)
        elif load or tcfg.get("load"):
            self._load_weights(model, load or tcfg["load"])
            if self.ema is not None:
                self.ema = ModelEma(model, cfg["ema"]["decay"])
        model, optimizer = self.amp.decorate(model, optimizer)
        self.raw_model, self.optimizer = model, optimizer
        self.model = paddle.DataParallel(model) if self.world_size > 1 else model
        self.ckpt = CheckpointManager(self.output_dir, tcfg["keep_last"])
        self.metrics = MetricsWriter(self.output_dir, enabled=self.main)
        if self.main:
            from passl.config import dump_config
            dump_config(cfg, os.path.join(self.output_dir, "config.yaml"))
        self.log.info(
            f"{self.world_size} process(es) on {self.device}, {self.amp.describe()}; global batch {self.global_batch} "
            f"({cfg['data']['train']['batch_size']} x {self.world_size} processes x {accum} accumulation); "
            f"{self.steps_per_epoch} steps/epoch x {cfg['epochs']} epochs; {len(self.datasets['train'])} training "
            f"images; seed {seed}: model stream per step = SeedSequence([seed, rank, step, 7]), samples reseeded "
            f"from SeedSequence([seed, epoch, position]), workers from SeedSequence([seed, epoch, rank, worker, 1])")

    def _restore(self, ckpt, path, model, optimizer):
        for key in ("model", "optimizer", "epoch", "batch", "global_step"):
            if key not in ckpt:
                raise CheckpointError(f"{path}: not a training checkpoint (no '{key}'); use --load for weights")
        missing, unexpected = model.set_state_dict(ckpt["model"])
        if missing or unexpected:
            raise CheckpointError(f"{path}: model keys do not match the config's model: missing {missing}, "
                                  f"unexpected {unexpected}")
        optimizer.set_state_dict(optimizer_state_from_names(ckpt["optimizer"], model))
        if self.amp.scaler is not None and ckpt.get("scaler"):
            self.amp.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema"):
                self.ema.set_state_dict(ckpt["ema"])
            else:
                self.ema = ModelEma(model, self.cfg["ema"]["decay"])
        sampler = ckpt.get("sampler", {})
        if ckpt["batch"] and (sampler.get("world_size"), sampler.get("batch_size")) != \
                (self.world_size, self.cfg["data"]["train"]["batch_size"]):
            raise CheckpointError(f"{path} stopped mid-epoch with {sampler.get('world_size')} processes x batch "
                                  f"{sampler.get('batch_size')}; resume it with the same, or from an epoch checkpoint")
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"])
        self.progress = {k: ckpt.get(k) for k in ("epoch", "batch", "global_step", "best")}
        self.log.info(f"resumed {path}: epoch {ckpt['epoch']} batch {ckpt['batch']} step {ckpt['global_step']}")

    # -----------------------------------------------------------------------------------------
    # the loop

    def _train(self, load, resume):
        self._setup(load, resume)
        epochs, start = self.cfg["epochs"], time.time()
        self.t_start = start
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self._install_signal_handlers()
        try:
            while self.progress["epoch"] < epochs:
                status = self._train_epoch()
                if status != EXIT_OK:
                    return status
                if not self._end_of_epoch():
                    return EXIT_INTERRUPTED
        finally:
            for s, handler in previous.items():
                with contextlib.suppress(ValueError):
                    signal.signal(s, handler)
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
        best = self.progress["best"]
        best_text = f"best top1 {best['top1']:.3f} ({best['which']}, epoch {best['epoch']})" if best else "no evaluation"
        self.log.info(f"done: {epochs} epochs, {self.progress['global_step']} steps in "
                      f"{format_eta(time.time() - start)}; {best_text}; checkpoints in {self.output_dir}")
        self._report_bad_images()
        return EXIT_OK

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self.stop_requested:   # second Ctrl-C: give up at once
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log.warning(f"signal {signum}: stopping after this step and saving a resumable checkpoint "
                             "(press Ctrl-C again to abort without saving)")
        try:
            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGTERM, handler)
        except ValueError:   # not the main thread
            pass

    def _train_epoch(self):
        cfg, tcfg = self.cfg, self.cfg["train"]
        epoch, accum, log_interval = self.progress["epoch"], tcfg["accum_steps"], tcfg["log_interval"]
        start_batch = self.progress["batch"]
        n_batches = self.steps_per_epoch * accum   # leftover micro-batches would spill into the next epoch
        self.train_loader.set_epoch(epoch, start_batch)
        self.model.train()
        interval, self.epoch_meter = DeviceMeter(), DeviceMeter()
        bad_step = paddle.full([], _NO_BAD_STEP, dtype="int64")
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg['epochs']}", self.main, start_batch // accum)
        t_interval, data_wait, steps_in_interval = time.time(), 0.0, 0
        t_fetch = time.time()
        batch_index = start_batch
        for batch in self.train_loader:
            if batch_index >= n_batches:
                break
            data_wait += time.time() - t_fetch
            micro = batch_index % accum
            step = self.progress["global_step"]
            if micro == 0:
                paddle.seed(step_seed(cfg["seed"], self.rank, step))
            sync = self.world_size > 1 and micro != accum - 1
            with (self.model.no_sync() if sync else contextlib.nullcontext()):
                with self.amp.autocast():
                    outputs = self.model(batch["image"])
                    losses = self.loss_fn(outputs, batch)
                loss = losses["loss"]
                scaled = loss / accum if accum > 1 else loss
                (self.amp.scaler.scale(scaled) if self.amp.scaler is not None else scaled).backward()
            finite = paddle.isfinite(loss.astype("float32")).reshape([])
            bad_step = paddle.where(finite, bad_step, paddle.minimum(bad_step, paddle.full([], step, "int64")))
            interval.add(losses)
            self.epoch_meter.add({"loss": loss})
            batch_index += 1
            if micro == accum - 1:
                self._optimizer_step(step)
                steps_in_interval += 1
                if bar is not None:
                    bar.update(1)
                step += 1
                at_end = batch_index >= n_batches
                if step % log_interval == 0 or at_end or (self.world_size == 1 and self.stop_requested):
                    bad, stop = self._sync_flags(bad_step)
                    if bad is not None:
                        return self._nonfinite(bad, epoch, bar)
                    self._log_interval(epoch, batch_index, interval, steps_in_interval, data_wait,
                                       time.time() - t_interval, bar)
                    t_interval, data_wait, steps_in_interval = time.time(), 0.0, 0
                    if stop and not at_end:
                        self.progress["batch"] = batch_index
                        return self._save_interrupted(bar)
            t_fetch = time.time()
        if bar is not None:
            bar.close()
        self.progress["batch"] = n_batches
        return EXIT_OK

    def _optimizer_step(self, step):
        lr = self.schedule(step)
        self.optimizer.set_lr(lr)
        # Paddle names optimizer state "<param>_moment1_<n>" with a process-wide counter n; a private
        # name generator keeps n = 0, so a checkpoint restores into any process
        with unique_name.guard(self._optimizer_names):
            if self.amp.scaler is not None:
                self.amp.scaler.step(self.optimizer)
                self.amp.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.clear_grad()
        if self.ema is not None:
            self.ema.update(self.model)
        self.progress["global_step"] = step + 1

    def _sync_flags(self, bad_step):
        """One host sync: the first non-finite step (over all ranks) and whether to stop."""
        flags = paddle.stack([bad_step, paddle.full([], -int(self.stop_requested), "int64")])
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        bad, stop = (int(v) for v in flags.numpy())
        return (None if bad == _NO_BAD_STEP else bad), stop < 0

    def _nonfinite(self, step, epoch, bar):
        if bar is not None:
            bar.close()
        kept = os.path.join(self.output_dir, "latest.pdckpt")
        kept = kept if os.path.exists(kept) else "none yet"
        self.log.error(f"error: the loss became NaN or infinite at global step {step} (epoch {epoch + 1}); "
                       f"stopping without saving. Last good checkpoint: {kept}. Lower the lr, set "
                       "train.grad_clip, or check the data, then --resume.")
        return EXIT_FAILED

    def _save_interrupted(self, bar):
        if bar is not None:
            bar.close()
        if self.main:
            path = self.ckpt.save_latest(self._state())
            self.log.warning(f"interrupted at epoch {self.progress['epoch'] + 1} batch {self.progress['batch']} "
                             f"(step {self.progress['global_step']}); saved {path}. Continue with --resume")
        return EXIT_INTERRUPTED

    def _log_interval(self, epoch, batch_index, meter, steps, data_wait, seconds, bar):
        means = meter.means()
        if not self.main or steps == 0:
            return
        step = self.progress["global_step"]
        lr = self.schedule(step - 1)
        total = self.cfg["epochs"] * self.steps_per_epoch
        per_step = seconds / steps
        terms = "  ".join(f"{k} {means[k]:.4f}" for k in sorted(means, key=lambda k: (k != "loss", k)))
        line = (f"epoch {epoch + 1}/{self.cfg['epochs']} step {batch_index // self.cfg['train']['accum_steps']}/"
                f"{self.steps_per_epoch} (global {step})  lr {lr:.3e}  {terms}  "
                f"{self.global_batch * steps / max(seconds, 1e-9):.1f} samples/s  data wait "
                f"{data_wait / max(seconds, 1e-9):.0%}  eta {format_eta((total - step) * per_step)}")
        if bar is not None:
            bar.set_postfix_str(f"loss {means.get('loss', float('nan')):.4f} lr {lr:.2e}")
            bar.write(line)
            _file_only(self.log, line)
        else:
            self.log.info(line)
        self.metrics.scalars({**means, "lr": lr}, step)

    def _end_of_epoch(self):
        """Evaluate, checkpoint, write metrics. Returns False when a stop was requested."""
        epoch = self.progress["epoch"] + 1
        self.progress.update(epoch=epoch, batch=0)
        train_loss = self.epoch_meter.means().get("loss")
        record = {"epoch": epoch, "train_loss": train_loss, "lr": self.schedule(self.progress["global_step"] - 1)}
        is_last = epoch == self.cfg["epochs"]
        best_weights = None
        is_best = False
        if self.val_loader is not None and (epoch % self.cfg["train"]["eval_interval"] == 0 or is_last):
            result = evaluate(self.model, self.val_loader, self.amp.autocast)
            record.update(val_top1=result["top1"], val_top5=result["top5"])
            scores = {"model": result["top1"]}
            if self.ema is not None:
                ema_result = evaluate(self.ema.module, self.val_loader, self.amp.autocast)
                record.update(ema_top1=ema_result["top1"], ema_top5=ema_result["top5"])
                scores["ema"] = ema_result["top1"]
            which = max(scores, key=lambda k: (scores[k], k == "ema"))
            best = self.progress["best"]
            if best is None or scores[which] > best["top1"]:
                is_best = True
                self.progress["best"] = {"top1": scores[which], "which": which, "epoch": epoch}
                best_weights = (self.ema.state_dict() if which == "ema" else _unwrap(self.model).state_dict())
        record["wall_time"] = round(time.time() - self.t_start, 3)
        if self.main:
            path = self.ckpt.save_epoch(self._state(), epoch, is_best, best_weights)
            self.metrics.epoch(record)
            shown = "  ".join(f"{k} {v:.4g}" if k == "lr" else f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in record.items())
            self.log.info(f"{shown}{'  (best)' if is_best else ''} -> {path}")
        if self.world_size > 1:
            stop = paddle.full([1], int(self.stop_requested), "int64")
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)   # every rank stops after the same epoch
            self.stop_requested = bool(int(stop.numpy()[0]))
        if self.stop_requested and not is_last:
            self.log.warning(f"stopped after epoch {epoch}; continue with --resume")
            return False
        return True

    def _state(self):
        model = _unwrap(self.model)
        return {
            "model": model.state_dict(),
            "optimizer": optimizer_state_by_names(self.optimizer, model),
            "scaler": self.amp.scaler.state_dict() if self.amp.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.progress["epoch"], "batch": self.progress["batch"],
            "global_step": self.progress["global_step"], "best": self.progress["best"],
            "sampler": {"epoch": self.progress["epoch"], "batch": self.progress["batch"], "seed": self.cfg["seed"],
                        "world_size": self.world_size, "batch_size": self.cfg["data"]["train"]["batch_size"]},
            "rng": rng_state(), "config": self.cfg,
        }

    def _report_bad_images(self):
        """Count the images skipped as undecodable and list them all in output_dir/bad_images_<split>.txt:
        rank 0 writes those every rank's loader met (a collective: every rank calls this)."""
        for split, dataset in sorted(self.datasets.items()):
            bad = sorted(set(getattr(dataset, "bad_images", None) or ()))
            if self.world_size > 1:
                gathered = []
                dist.all_gather_object(gathered, bad)
                bad = sorted(set().union(*gathered))
            if bad and self.main:
                listing = os.path.join(self.output_dir, f"bad_images_{split}.txt")
                write_text(listing, "".join(f"{path}\n" for path in bad))
                self.log.warning(f"{len(bad)} undecodable {split} image(s) were skipped "
                                 f"(skip_bad_images: true), e.g. {bad[0]}; all listed in {listing}")


def _file_only(logger, line):
    """Write ``line`` to the log file handlers only (the console shows it above the tqdm bar)."""
    import logging
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)

