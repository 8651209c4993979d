"""Training: models, samplers (plain PyTorch) and Ray Train loops."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    """One progress line from a Ray Train worker (rank 0), shown once on the driver.

    Not ``print``: Ray Train patches ``print`` in its workers to write the line and also log it
    to the root logger, and the driver then shows every line twice.
    """
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()
