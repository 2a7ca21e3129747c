"""Training engine: optimizer and lr schedules, EMA, checkpoints, evaluation, logging, the Trainer."""
from passl.engine import optim  # noqa: F401  (registers AdamW and the lr schedules)
from passl.engine.ema import ModelEma  # noqa: F401
from passl.engine.evaluate import evaluate  # noqa: F401
