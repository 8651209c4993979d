"""LLM engines behind one protocol (see :mod:`raydapt.engines.base`)."""
