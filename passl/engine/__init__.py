"""Training engine: ``train`` and ``evaluate_only`` (trainer.py) over the run built by setup.py,
the optimizer step (step.py), optimizer and lr schedules (optim.py), EMA, checkpoints, guards,
evaluation and logging."""
from passl.engine import optim  # noqa: F401  (registers AdamW and the lr schedules)
from passl.engine.ema import ModelEma  # noqa: F401
from passl.engine.evaluate import evaluate  # noqa: F401
from passl.engine.trainer import evaluate_only, train  # noqa: F401
