"""Training: the engine train.py drives, its objectives (losses, SCST rewards) and fine-tuning."""
