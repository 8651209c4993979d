"""Fail fast and clean: what every job checks before it starts anything, and how it stops.

:func:`check_inputs` is method-agnostic: given the model references and data paths of a job, it
resolves every reference cheaply (package installed, ``config.json`` present, hub repo exists —
no weights loaded) and checks every path (exists, is a file, not empty, known format), then
raises one :class:`PreflightError` listing every problem. Each job config lists its
references and paths (``JobBase.inputs``, one small method per method's config). :func:`checked_job`
wraps a job run (``raydapt run``, ``raydapt sweep``): the preflight runs first — before Ray,
MLflow or any stage starts — and a file whose rows were all rejected ends the job with its
``rejects.parquet`` and one clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raydapt import RaydaptError
from raydapt.config import DataInput, ModelInput
from raydapt.data.readers import DataError, NoUsableRows, check_not_empty, detect_format


class PreflightError(RaydaptError):
    """One or more model references or data paths of a job cannot be used."""


def check_inputs(models: list[ModelInput], paths: list[DataInput]) -> list[str]:
    """Check every model reference and data path; return one line per input checked.

    Raises:
        PreflightError: naming each bad input by its config key (all of them, one message).
    """
    from raydapt.core.assets import check_model_ref

    problems, done = [], []
    seen: set[tuple[str, str | None]] = set()
    for m in models:
        if (m.ref, m.revision) in seen:
            continue
        seen.add((m.ref, m.revision))
        try:
            done.append(f"{m.key}: {check_model_ref(m.ref, revision=m.revision, token=m.token)}")
        except RaydaptError as exc:
            problems.append(f"{m.key}: {exc}")
    for d in paths:
        try:
            if "://" not in str(d.path):
                if not d.path.exists():
                    raise DataError(f"data file not found: {d.path}")
                if not d.path.is_file():
                    raise DataError(f"{d.path} is a directory, not a data file")
                check_not_empty(d.path)
            detect_format(d.path, d.fmt)
            done.append(f"{d.key}: {d.path}")
        except RaydaptError as exc:
            problems.append(f"{d.key}: {exc}")
    if problems:
        raise PreflightError(problems[0] if len(problems) == 1 else
                             f"{len(problems)} inputs cannot be used: " + "; ".join(problems))
    return done


def preflight(cfg: Any) -> list[str]:
    """Check every model reference and data path of a job before anything starts."""
    return check_inputs(*cfg.inputs())


@contextmanager
def checked_job(cfg: Any) -> Iterator[None]:
    """Preflight, then run the job's body. A file with no usable rows writes its rejects to
    ``<run.output_dir>/<run.name>/rejects.parquet`` and ends the job with one error line."""
    preflight(cfg)
    try:
        yield
    except NoUsableRows as exc:
        out = Path(cfg.run.output_dir) / cfg.run.name
        out.mkdir(parents=True, exist_ok=True)
        path = out / "rejects.parquet"
        exc.rejects.astype({"id": object}).to_parquet(path)
        raise DataError(f"no usable rows in {exc.file}: {len(exc.rejects)} rejected, "
                        f"see {path}") from None
