"""Training: stage recipes, data, losses, checkpoints and the trainer loop."""
