"""Fail fast and clean: what every job checks before it starts anything, and how it stops.

:func:`checked_job` wraps a job run (``raydapt run``, ``raydapt sweep``): it turns a file whose
rows were all rejected into its ``rejects.parquet`` plus one clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raydapt.data.readers import DataError, NoUsableRows


@contextmanager
def checked_job(cfg: Any) -> Iterator[None]:
    """Run a job's body; a file with no usable rows writes its rejects to
    ``<run.output_dir>/<run.name>/rejects.parquet`` and ends the job with one error line."""
    try:
        yield
    except NoUsableRows as exc:
        out = Path(cfg.run.output_dir) / cfg.run.name
        out.mkdir(parents=True, exist_ok=True)
        path = out / "rejects.parquet"
        exc.rejects.astype({"id": object}).to_parquet(path)
        raise DataError(f"no usable rows in {exc.file}: {len(exc.rejects)} rejected, "
                        f"see {path}") from None
