"""Training and evaluation of capsule networks: ``capsnet-ext train`` / ``capsnet-ext eval``.

::

    from capsnet_ext.training import load_config, train, load_checkpoint, PRESETS
    cfg = load_config(preset="mnist", epochs=1, out="runs/quick")
    result = train(cfg)             # {"test_error": ..., "best_checkpoint": ..., ...}
    ckpt = load_checkpoint(result["last_checkpoint"])
"""
from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import PRESETS, TrainConfig, load_config
from .evaluation import ensemble_metrics, evaluate
from .trainer import train

__all__ = ["TrainConfig", "load_config", "PRESETS", "train", "load_checkpoint",
           "model_from_checkpoint", "evaluate", "ensemble_metrics"]
