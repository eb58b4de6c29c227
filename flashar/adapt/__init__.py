"""Two-stage FlashAR adaptation (reference/flashar_method.md §7): data, schedule, trainer, checkpoints."""
