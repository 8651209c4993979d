"""Loss functions: plain PyTorch, no Ray import. Shapes are documented per function."""
