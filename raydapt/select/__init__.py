"""Data selectors for NTK-Selector and its baselines (one interface)."""
