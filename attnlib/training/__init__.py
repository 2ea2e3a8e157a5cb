"""Training: the loop behind ``attnlib-train``, tasks and metrics, checkpoints, DDP setup."""

from attnlib.training.checkpoint import atomic_save, load_checkpoint
from attnlib.training.loop import TRAINER_DEFAULTS, NonFiniteLossError, init_weights_from, train
from attnlib.training.metrics import edit_distance
from attnlib.training.tasks import evaluate, train_loss

__all__ = [
    "TRAINER_DEFAULTS",
    "NonFiniteLossError",
    "atomic_save",
    "edit_distance",
    "evaluate",
    "init_weights_from",
    "load_checkpoint",
    "train",
    "train_loss",
]
