"""Former name of ``trainer.evaluation`` (kept so existing imports keep working)."""
from .evaluation import *  # noqa: F401,F403
from .evaluation import evaluate_checkpoint, evaluate_ensemble, format_members  # noqa: F401
