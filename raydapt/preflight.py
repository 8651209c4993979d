"""Fail fast and clean: what every job checks before it starts anything, and how it stops.

:func:`check_inputs` is method-agnostic: given the model references and data paths of a job, it
resolves every reference cheaply (package installed, ``config.json`` present, hub repo exists —
no weights loaded) and checks every path (exists, is a file, not empty, known format), then
raises one :class:`PreflightError` listing every problem. :func:`job_inputs` lists a job's
references and paths from its config (one small function per method). :func:`checked_job`
wraps a job run (``raydapt run``, ``raydapt sweep``): the preflight runs first — before Ray,
MLflow or any stage starts — and a file whose rows were all rejected ends the job with its
``rejects.parquet`` and one clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydapt import RaydaptError
from raydapt.data.readers import DataError, NoUsableRows, check_not_empty, detect_format


class PreflightError(RaydaptError):
    """One or more model references or data paths of a job cannot be used."""


@dataclass(frozen=True)
class ModelInput:
    key: str  # the config key, for the message (e.g. "distill.student")
    ref: str
    revision: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class DataInput:
    key: str  # e.g. "data.source.path"
    path: Path
    fmt: str = "auto"


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


def job_inputs(cfg: Any) -> tuple[list[ModelInput], list[DataInput]]:
    """The model references and data paths a job config names, by method."""
    from raydapt.config import _expand_env  # defaults (e.g. ${RAYDAPT_DATA:-...}) stay unexpanded

    if cfg.method == "simda":
        root = Path(_expand_env(cfg.data.root))
        t = cfg.teacher
        return ([ModelInput("teacher.model", t.model, t.revision, t.hf_token),
                 ModelInput("distill.student", cfg.distill.student)],
                [DataInput("data.source.path", root / cfg.data.source.path,
                           cfg.data.source.format),
                 DataInput("data.target.path", root / cfg.data.target.path,
                           cfg.data.target.format)])
    if cfg.method == "dallmi":
        return ([ModelInput("model.encoder", cfg.model.encoder)],
                [DataInput("data.path", Path(_expand_env(cfg.data.root)) / cfg.data.path,
                           cfg.data.format)])
    if cfg.method == "ntk_select":
        root = Path(_expand_env(cfg.data.root))
        return ([ModelInput("model", cfg.model)],  # the LoRA base (also the scoring model)
                [DataInput(f"data.pool[{i}]", root / p) for i, p in enumerate(cfg.data.pool)]
                + [DataInput(f"data.tasks[{i}].path", root / t.path)
                   for i, t in enumerate(cfg.data.tasks)])
    raise RaydaptError(f"no preflight for method {cfg.method!r}")  # pragma: no cover


def preflight(cfg: Any) -> list[str]:
    """Check every model reference and data path of a job before anything starts."""
    return check_inputs(*job_inputs(cfg))


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
