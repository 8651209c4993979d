"""Training: models, samplers (plain PyTorch) and Ray Train loops."""
