"""fanlora: find where LoRA should go in a backbone (FanLoRA), then adapt and serve tasks on that setting."""

__version__ = "0.1.0"
