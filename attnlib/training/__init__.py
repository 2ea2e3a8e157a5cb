"""Training: the loop behind ``attnlib-train``, tasks and metrics, checkpoints, run directories, DDP setup."""

from attnlib.training.checkpoint import CheckpointError, atomic_save, load_checkpoint
from attnlib.training.loop import TRAINER_DEFAULTS, NonFiniteLossError, init_weights_from, train, validate_trainer
from attnlib.training.metrics import edit_distance
from attnlib.training.rundir import RunDirError
from attnlib.training.tasks import evaluate, train_loss

__all__ = [
    "TRAINER_DEFAULTS",
    "CheckpointError",
    "NonFiniteLossError",
    "RunDirError",
    "atomic_save",
    "edit_distance",
    "evaluate",
    "init_weights_from",
    "load_checkpoint",
    "train",
    "train_loss",
    "validate_trainer",
]
