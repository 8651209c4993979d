"""raydapt: adapt language models to new, low-resource domains on Ray.

Methods: SimDA (kNN-augmented LLM annotation + similarity distillation), DALLMi (multi-label
positive-unlabeled adaptation) and NTK-Selector (auxiliary data selection with a Jacobian-free
neural tangent kernel). Each method is one recipe in :mod:`raydapt.recipes`; the reusable pieces
(engines, Ray Data stages, losses, samplers, Ray Train loops) live in the subpackages.
"""

__version__ = "0.1.0"


class RaydaptError(Exception):
    """A user-facing error: the CLI prints its message without a stack trace."""
