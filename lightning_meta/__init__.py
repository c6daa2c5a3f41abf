"""lightning-meta: a PyTorch Lightning ecosystem for scalable meta-learning."""

from lightning_meta.episode import Episode, collate_episodes

__version__ = "0.1.0"

__all__ = ["Episode", "__version__", "collate_episodes"]
