"""modelgrow: grow small pretrained transformer checkpoints into larger ones."""

__version__ = "0.1.0"
