"""Adapters for outside formats: LLaVA/VILA conversations, datasets and checkpoints."""
