"""The training loop, in one process or many (paddle.distributed.launch), with exact resume.

Reading order: ``train`` builds the run (setup.build_run) and calls ``fit``, which runs
``train_one_epoch`` and then ``end_epoch`` (evaluate, keep the best, checkpoint) until the last
epoch; ``train_one_epoch`` calls ``train_step`` on every micro-batch. ``evaluate_only`` needs
nothing but the validation data.

Randomness in the model (MixToken, drop path) is reseeded at every optimizer step from
(seed, rank, step), and data augmentation per sample (passl.data.loader), so a resumed run
repeats the uninterrupted one exactly and every rank has its own recorded stream. Losses stay on
the device; the only host syncs are once per log interval (guards.RunFlags.sync and the loss meters,
reduced over the processes there) and per epoch. At the end of every epoch the BatchNorm running
statistics are averaged over the processes, so all evaluate, and the checkpoint keeps, one model.
"""
import json
import os
import time

import numpy as np
import paddle

from passl.engine.amp import resolve_amp
from passl.engine.checkpoint import float32_weights
from passl.engine.evaluate import evaluate, pick_best
from passl.engine.guards import (Interrupted, NonFiniteLoss, claim_output_dir, explain_failure, nonfinite_message,
                                 stop_on_signals)
from passl.engine.logging import EpochReport, format_epoch_line, format_eta, progress_bar, report_bad_images
from passl.engine.setup import _load_weights, build_model, build_run, build_split_loader, start_session
from passl.data.datasets import check_same_classes
from passl.errors import ConfigError, DataError
from passl.utils import distributed as du
from passl.utils.fileio import write_text

__all__ = ["train", "evaluate_only", "fit", "train_one_epoch", "train_step", "end_epoch", "step_seed"]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def train(cfg, load=None, resume=None, overwrite=False):
    """Train the model of ``cfg`` (a resolved config) for ``cfg['epochs']`` epochs.

    ``load``: initial weights; ``resume``: a checkpoint path or 'auto' (the newest in output_dir).
    The run holds output_dir (guards.claim_output_dir): a fresh run over an earlier one's checkpoints
    stops unless ``overwrite``, which moves the earlier run to ``output_dir.old-<time>``.
    Ctrl-C or SIGTERM stops after the current step with a resumable checkpoint.
    Returns 0, 1 (non-finite loss) or 130 (interrupted).
    """
    session = start_session(cfg)
    continuing = resume == "auto" or bool(resume) and _same_dir(resume, session.output_dir)
    with explain_failure(session.log), claim_output_dir(session.output_dir, session.main, continuing, overwrite,
                                                        session.log.info):
        run = build_run(session, load, resume)
        with run.metrics, stop_on_signals(run.flags, session.log):
            status = fit(run)
        if status == EXIT_OK:
            report_bad_images(run.datasets(), session.output_dir, session.log, session.main)
        return status


def _same_dir(path, directory):
    """Whether the file ``path`` lies in ``directory`` (then --resume continues the run kept there)."""
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(directory)


def fit(run):
    """Train from ``run.progress`` to the last epoch; after each epoch evaluate, keep the best and
    checkpoint. Returns EXIT_OK, EXIT_FAILED (non-finite loss: nothing saved) or EXIT_INTERRUPTED
    (a stop was requested: the state is saved and ``--resume`` continues it)."""
    epochs, progress, started = run.cfg["epochs"], run.progress, time.time()
    try:
        while progress.epoch < epochs:
            train_loss = train_one_epoch(run)
            end_epoch(run, train_loss, wall_time=time.time() - started)
            if run.flags.agree_to_stop() and progress.epoch < epochs:
                run.log.warning(f"stopped after epoch {progress.epoch}; continue with --resume")
                return EXIT_INTERRUPTED
    except NonFiniteLoss as e:
        run.log.error(nonfinite_message(e.step, progress.epoch, run.session.output_dir, e.consecutive))
        return EXIT_FAILED
    except Interrupted:
        per_rank = _settle_bn_statistics(run, keep_per_rank=True)   # a collective: on every rank
        if run.session.main:
            state = run.state()
            state["bn_by_rank"] = per_rank
            path = run.checkpoints.save_latest(state)
            run.log.warning(f"interrupted at epoch {progress.epoch + 1} batch {progress.batch} "
                            f"(step {progress.global_step}); saved {path}. Continue with --resume")
        return EXIT_INTERRUPTED
    best = progress.best
    best_text = (f"best top1 {best['top1']:.3f} ({best['which']}, epoch {best['epoch']}, select_best "
                 f"{best.get('rule', 'better')})" if best else "no evaluation")
    run.log.info(f"done: {epochs} epochs, {progress.global_step} steps in {format_eta(time.time() - started)}; "
                 f"{best_text}; checkpoints in {run.session.output_dir}")
    return EXIT_OK


def train_one_epoch(run):
    """Train the rest of epoch ``progress.epoch``: all of it, or from ``progress.batch`` after a
    mid-epoch resume. Returns this process's mean loss over the micro-batches it ran.

    Every ``log_interval`` optimizer steps, at the end of the epoch and, in a single process, right
    after a stop request, the ranks agree on the flags: NonFiniteLoss or Interrupted is raised
    there, before any further step.
    """
    progress, accum = run.progress, run.optimizer_step.accum_steps
    n_batches = run.steps_per_epoch * accum
    run.train_loader.set_epoch(progress.epoch, progress.batch)
    run.flags.new_epoch()
    run.model.train()
    with EpochReport(run.log, run.metrics, run.session.main, progress.epoch, run.cfg["epochs"],
                     run.steps_per_epoch, run.global_batch, start_step=progress.batch // accum) as report:
        # a pass left early (break, error, signal) shuts its loader workers down: passl/data/loader.py
        for batch_index, batch in report.timed(enumerate(run.train_loader, start=progress.batch)):
            if batch_index >= n_batches:   # leftover micro-batches would spill into the next epoch
                break
            if batch_index % accum == 0:                # MixToken and drop path draw from (seed, rank, step)
                paddle.seed(step_seed(run.cfg["seed"], run.session.rank, progress.global_step))
            update = (batch_index + 1) % accum == 0     # the last micro-batch of an optimizer step
            losses = train_step(run, batch, update)
            run.flags.watch(losses["loss"], progress.global_step)
            report.add(losses)
            if not update:
                continue
            run.flags.end_step(progress.global_step, run.optimizer_step.skipped)
            progress.global_step, progress.batch = progress.global_step + 1, batch_index + 1
            report.step_done()
            at_end = progress.batch == n_batches
            if progress.global_step % run.cfg["train"]["log_interval"] == 0 or at_end or run.flags.stop_now():
                stop = run.flags.sync()
                report.log_interval(progress.batch // accum, progress.global_step,
                                    lr=run.lr(progress.epoch, progress.batch // accum - 1),
                                    skipped=run.flags.skipped_in_interval)
                if stop and not at_end:
                    raise Interrupted()
        return report.epoch_loss()


def train_step(run, batch, update):
    """Forward and backward one micro-batch; when ``update``, step the optimizer with the scheduled
    lr and fold the new weights into the EMA. Returns {loss name: 0-d tensor}, still on the device."""
    norms = run.optimizer_step.norm_statistics     # set when a loss scaler may skip this step
    with run.optimizer_step.accumulating(run.model, update):
        saved = norms.save() if norms is not None else None
        with run.amp.autocast():
            losses = run.loss_fn(run.model(batch["image"]), batch)
        if norms is not None:
            norms.keep_if_finite(saved, losses["loss"])
        run.optimizer_step.backward(losses["loss"])
    if update:
        progress = run.progress    # progress.batch: the micro-batches before this step's
        run.optimizer_step.step(run.lr(progress.epoch, progress.batch // run.optimizer_step.accum_steps))
        if run.ema is not None:
            run.ema.update(run.model, run.optimizer_step.optimizer)   # O2: its float32 master weights
    return losses


def step_seed(seed, rank, step):
    """Seed of the Paddle generator for optimizer step ``step`` on ``rank``."""
    return int(np.random.SeedSequence([seed, rank, step, 7]).generate_state(1)[0])


def end_epoch(run, train_loss, wall_time):
    """Close the epoch just trained: evaluate when due (every ``eval_interval`` epochs and the last),
    keep the best by ``train.select_best`` (the rule goes into the record and the checkpoint's ``best``),
    write the epoch checkpoint and its metrics.jsonl line."""
    progress, epochs = run.progress, run.cfg["epochs"]
    progress.epoch, progress.batch = progress.epoch + 1, 0
    _settle_bn_statistics(run)     # every rank evaluates, and the checkpoint keeps, the same model
    record = {"epoch": progress.epoch, "train_loss": train_loss,
              "lr": run.lr(progress.epoch - 1, run.steps_per_epoch - 1)}    # the lr of the epoch's last step
    if run.optimizer_step.scaler is not None:        # steps the loss scaler skipped (non-finite gradients)
        record["skipped_steps"] = run.flags.skipped_in_epoch
    best_weights = None
    if run.val_loader is not None and (progress.epoch % run.cfg["train"]["eval_interval"] == 0
                                       or progress.epoch == epochs):
        rule = run.cfg["train"]["select_best"]
        new_best = pick_best(_evaluate_epoch(run, record), progress.best, progress.epoch, rule)
        record["select_best"] = rule
        if new_best is not None:
            if progress.best is not None and progress.best.get("rule", "better") != rule:
                run.log.warning(f"train.select_best is now '{rule}'; the best so far (epoch {progress.best['epoch']}) "
                                f"was kept by '{progress.best.get('rule', 'better')}', so epoch {progress.epoch} "
                                "becomes the best")
            progress.best = new_best
            best_weights = (run.ema.state_dict() if new_best["which"] == "ema"
                            else float32_weights(run.raw_model, run.optimizer_step.optimizer))
    record["wall_time"] = round(wall_time, 3)
    if run.session.main:
        path = run.checkpoints.save_epoch(run.state(), progress.epoch, best_weights is not None, best_weights)
        run.metrics.epoch(record)
        run.log.info(format_epoch_line(record, best_weights is not None, path))


def _settle_bn_statistics(run, keep_per_rank=False):
    """Average the BatchNorm running statistics of the model and its EMA over the processes (see
    distributed.average_bn_statistics; a collective, nothing to do with one process).

    ``keep_per_rank`` (a mid-epoch stop): first gather each rank's own statistics, returned as
    [{'model': {name: array}, 'ema': {...}} per rank] for the checkpoint, so that a resume gives every
    rank its own back and continues exactly as if never stopped; None with one process or no BatchNorm.
    """
    ema_module = run.ema.module if run.ema is not None else None
    per_rank = None
    model_stats = du.bn_statistics(run.raw_model) if keep_per_rank and run.session.world_size > 1 else {}
    if model_stats:
        own = {"model": {k: v.numpy() for k, v in model_stats.items()},
               "ema": {k: v.numpy() for k, v in du.bn_statistics(ema_module).items()} if ema_module else {}}
        per_rank = du.gather_objects(own)
    du.average_bn_statistics(run.raw_model, ema_module)
    return per_rank


def _evaluate_epoch(run, record):
    """Evaluate the model and its EMA; add val_/ema_ top1 and top5 to ``record``; return their top-1."""
    top1 = {}
    for which, prefix, model in (("model", "val", run.model), ("ema", "ema", run.ema and run.ema.module)):
        if model is not None:     # the float32 EMA under O1 autocast even in an O2 run: not cast down whole
            autocast = run.amp.autocast if which == "model" else run.amp.float32_weights_autocast
            result = evaluate(model, run.val_loader, autocast)
            record.update({f"{prefix}_top1": result["top1"], f"{prefix}_top5": result["top5"]})
            top1[which] = result["top1"]
    return top1


def _check_eval_classes(source, num_classes, weights, recorded):
    """The validation folder's classes must be those the weights were trained on: the list the file records
    (``recorded``, from a trainer checkpoint or best_model.safetensors), else as many as the model has outputs."""
    fix = ("give data.val.dataset.class_names the training classes in training order (a class with no images is "
           "then fine)")
    if recorded is not None:
        check_same_classes(source.classes, recorded, f"data.val.dataset ({source.root})",
                           f"the training set recorded in {weights}", fix)
    elif len(source.classes) != num_classes:
        raise DataError(f"data.val.dataset ({source.root}) has {len(source.classes)} classes but the model has "
                        f"{num_classes} outputs and {weights} does not record its class names, so labels cannot be "
                        f"matched by name; {fix}")


def evaluate_only(cfg, weights):
    """Evaluate ``weights`` (a weights file or a checkpoint, see setup._load_weights) on the validation
    set of ``cfg``. Prints one line and writes output_dir/eval.json (main process).

    Returns {'top1', 'top5', 'num_samples', 'weights' (absolute path), 'which', 'seconds'}, the same on
    every process.
    """
    session = start_session(cfg)
    session.use_output_dir()
    paddle.seed(cfg["seed"])
    model = build_model(cfg)
    report = _load_weights(model, weights, cfg["train"]["reinit_head"], session.log.info)
    which = report["which"]
    val_loader = build_split_loader(session, "val", model)
    if val_loader is None:
        raise ConfigError("--evaluate-only needs data.val.dataset in the config")
    _check_eval_classes(val_loader.dataset.source, model.num_classes, weights,
                        None if report["reinitialized"] else report["classes"])
    amp = resolve_amp(cfg["amp"], session.device, log=session.log.info,
                      warn=session.log.warning if session.main else None)
    started = time.time()
    bar = progress_bar(len(val_loader), "eval", session.main)
    result = evaluate(model, val_loader, amp.float32_weights_autocast, bar)   # the weights stay float32
    if bar is not None:
        bar.close()
    result.update(weights=os.path.abspath(weights), which=which, seconds=round(time.time() - started, 2))
    report_bad_images({"val": val_loader.dataset}, session.output_dir, session.log, session.main)
    if session.main:
        path = write_text(os.path.join(session.output_dir, "eval.json"), json.dumps(result, indent=1))
        print(f"eval {weights} ({which}): top1 {result['top1']:.3f}  top5 {result['top5']:.3f}  on "
              f"{result['num_samples']} images in {result['seconds']:.1f} s -> {path}", flush=True)
    return result
