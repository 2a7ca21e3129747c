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
from passl.engine.trainer import Trainer  # noqa: E402
from passl.utils.distributed import rank  # noqa: E402


def main(mode, config, result_dir, weights=None):
    if mode == "crash":   # rank 1 dies at step 2 while rank 0 waits for it in a collective
        original = Trainer._optimizer_step

        def step(self, index):
            if rank() == 1 and index == 2:
                raise RuntimeError("simulated crash on rank 1")
            original(self, index)
        Trainer._optimizer_step = step
    trainer = Trainer(load_config(config))
    if mode in ("train", "crash"):
        code = trainer.train()
        state = trainer.raw_model.state_dict()
        np.savez(os.path.join(result_dir, f"rank{rank()}.npz"), **{k: v.numpy() for k, v in state.items()})
    else:
        code = trainer.evaluate_only(weights)
        result = {k: trainer.last_eval[k] for k in ("top1", "top5", "num_samples")}
        with open(os.path.join(result_dir, f"eval_rank{rank()}.json"), "w") as f:
            json.dump(result, f)
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
