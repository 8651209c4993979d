"""One readable orchestration module per method. Only recipes know the order of stages."""
