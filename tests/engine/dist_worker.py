"""Run by test_distributed.py under `python -m paddle.distributed.launch` (or alone for one process):
train or evaluate, then write what this rank ended with into RESULT_DIR.

    dist_worker.py train CONFIG RESULT_DIR [--resume PATH] [--stop-after-step N]
    dist_worker.py eval CONFIG RESULT_DIR --weights PATH
    dist_worker.py crash CONFIG RESULT_DIR

train writes rank<r>.npz (the model's and, prefixed 'ema/', the EMA's final state) and rank<r>_losses.json
({epoch: [loss of each micro-batch this rank ran]}); --stop-after-step asks every rank to stop after that
many optimizer steps of this launch (as Ctrl-C on all of them). eval writes eval_rank<r>.json.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

import numpy as np  # noqa: E402

from passl.config import load_config  # noqa: E402
from passl.engine import evaluate_only, train  # noqa: E402
from passl.engine import logging as logging_module  # noqa: E402
from passl.engine import trainer as trainer_module  # noqa: E402
from passl.engine.step import OptimizerStep  # noqa: E402
from passl.utils.distributed import rank  # noqa: E402


def _crash_rank_1_at_step_2():
    """rank 1 dies before its third optimizer step while rank 0 waits for it in a collective"""
    original, steps = OptimizerStep.step, [0]

    def step(self, lr):
        if rank() == 1 and steps[0] == 2:
            raise RuntimeError("simulated crash on rank 1")
        steps[0] += 1
        original(self, lr)
    OptimizerStep.step = step


def _train(cfg, result_dir, resume, stop_after_step):
    runs, fit, add = [], trainer_module.fit, logging_module.EpochReport.add
    losses = {}

    def fit_and_keep(run):   # keeps this rank's run, for its final weights
        runs.append(run)
        if stop_after_step is not None:
            original, steps = run.optimizer_step.step, [0]

            def step(lr):
                original(lr)
                steps[0] += 1
                if steps[0] == stop_after_step:
                    run.flags.request_stop()
            run.optimizer_step.step = step
        return fit(run)

    def add_and_record(report, values):   # a host sync per step: in this test only
        losses.setdefault(report.epoch + 1, []).append(float(values["loss"]))
        return add(report, values)
    trainer_module.fit = fit_and_keep
    logging_module.EpochReport.add = add_and_record
    code = train(cfg, resume=resume)
    run = runs[0]
    state = {k: v.numpy() for k, v in run.raw_model.state_dict().items()}
    if run.ema is not None:
        state.update({f"ema/{k}": v.numpy() for k, v in run.ema.state_dict().items()})
    np.savez(os.path.join(result_dir, f"rank{rank()}.npz"), **state)
    with open(os.path.join(result_dir, f"rank{rank()}_losses.json"), "w") as f:
        json.dump(losses, f)
    return code


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "eval", "crash"])
    parser.add_argument("config")
    parser.add_argument("result_dir")
    parser.add_argument("--weights")
    parser.add_argument("--resume")
    parser.add_argument("--stop-after-step", type=int)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.mode == "crash":
        _crash_rank_1_at_step_2()
        return train(cfg)
    if args.mode == "train":
        return _train(cfg, args.result_dir, args.resume, args.stop_after_step)
    result = evaluate_only(cfg, args.weights)
    with open(os.path.join(args.result_dir, f"eval_rank{rank()}.json"), "w") as f:
        json.dump({k: result[k] for k in ("top1", "top5", "num_samples", "which")}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
