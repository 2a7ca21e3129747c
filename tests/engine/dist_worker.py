"""Run by test_distributed.py under `python -m paddle.distributed.launch`: train or evaluate, then
write what this rank ended with (weights as .npz, or the evaluation result) into RESULT_DIR."""
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
from passl.engine import trainer as trainer_module  # noqa: E402
from passl.engine.step import OptimizerStep  # noqa: E402
from passl.utils.distributed import rank  # noqa: E402


def main(mode, config, result_dir, weights=None):
    cfg = load_config(config)
    if mode == "crash":   # rank 1 dies before its third optimizer step while rank 0 waits for it in a collective
        original, steps = OptimizerStep.step, [0]

        def step(self, lr):
            if rank() == 1 and steps[0] == 2:
                raise RuntimeError("simulated crash on rank 1")
            steps[0] += 1
            original(self, lr)
        OptimizerStep.step = step
        return train(cfg)
    if mode == "train":
        runs, fit = [], trainer_module.fit

        def fit_and_keep(run):   # keeps this rank's run, for its final weights
            runs.append(run)
            return fit(run)
        trainer_module.fit = fit_and_keep
        code = train(cfg)
        state = runs[0].raw_model.state_dict()
        np.savez(os.path.join(result_dir, f"rank{rank()}.npz"), **{k: v.numpy() for k, v in state.items()})
        return code
    result = evaluate_only(cfg, weights)
    with open(os.path.join(result_dir, f"eval_rank{rank()}.json"), "w") as f:
        json.dump({k: result[k] for k in ("top1", "top5", "num_samples")}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
