"""Former name of ``trainer.inference`` (kept so existing imports keep working)."""
from .inference import LoadedModel, model_from_checkpoint  # noqa: F401
