"""Fail fast and clean: what every job checks before it starts anything, and how it stops.

:func:`check_inputs` is method-agnostic: given the model references and data paths of a job, it
resolves every reference cheaply (package installed, ``config.json`` and weight files present,
hub repo exists — no weights loaded) and checks every path (exists, is a file, readable, not
empty, known format), then raises one :class:`PreflightError` listing every problem.
:func:`preflight` adds what every job needs besides its inputs: the output, cache and store
directories can be written (:func:`check_writable`) and the MLflow tracking server answers
within a few seconds (:func:`check_tracking`). Each job config lists its
references and paths (``JobBase.inputs``, one small method per method's config). :func:`checked_job`
wraps a job run (``raydapt run``, ``raydapt sweep``): the preflight runs first — before Ray,
MLflow or any stage starts — and a file whose rows were all rejected ends the job with its
``rejects.parquet`` and one clear error.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from raydapt import RaydaptError
from raydapt.config import DataInput, ModelInput
from raydapt.core.storage import OutputDir, is_uri
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
            check_weights(m.ref)
        except RaydaptError as exc:
            problems.append(f"{m.key}: {exc}")
    for d in paths:
        try:
            if "://" not in str(d.path):
                if not d.path.exists():
                    raise DataError(f"data file not found: {d.path}")
                if not d.path.is_file():
                    raise DataError(f"{d.path} is a directory, not a data file")
                check_readable(d.path)
                check_not_empty(d.path)
            detect_format(d.path, d.fmt)
            done.append(f"{d.key}: {d.path}")
        except RaydaptError as exc:
            problems.append(f"{d.key}: {exc}")
    if problems:
        raise PreflightError(problems[0] if len(problems) == 1 else
                             f"{len(problems)} inputs cannot be used: " + "; ".join(problems))
    return done


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.gguf", "tf_model.h5",
                "flax_model.msgpack")
"""Files one of which a local checkpoint directory must hold besides its ``config.json``."""


def check_weights(ref: str) -> None:
    """A local checkpoint directory holds weights, and a sharded checkpoint every shard its
    index names (``pkg:`` and ``hf:`` references are checked by
    :func:`raydapt.core.assets.check_model_ref`). Raises :class:`PreflightError`."""
    if ref.startswith(("pkg:", "hf:")):
        return
    p = Path(ref).expanduser()
    if not (p / "config.json").is_file():
        return
    for index in sorted(p.glob("*.index.json")):
        try:
            names = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError) as exc:
            raise PreflightError(f"{index} cannot be read: {exc}") from None
        missing = sorted(n for n in names if not (p / n).is_file())
        if missing:
            raise PreflightError(f"{p}: {index.name} names {len(missing)} weight file(s) that "
                                 f"are not there: {', '.join(missing[:3])}"
                                 + (" ..." if len(missing) > 3 else ""))
    if not any(f.is_file() for pat in WEIGHT_FILES for f in p.glob(pat)):
        raise PreflightError(
            f"{p} has a config.json but no weights (none of {', '.join(WEIGHT_FILES)}); copy "
            "the weight files there, or point at the complete checkpoint")


def check_readable(path: Path) -> None:
    """The file can be opened and read by this process (a permission problem is one line, not a
    PermissionError traceback from a later stage)."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        raise DataError(f"{path}: permission denied (this process cannot read it; "
                        "chmod a+r it, or run as its owner)") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read: {exc.strerror or exc}") from None


def _existing_ancestor(p: Path) -> Path:
    p = p.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(key: str, path: str | Path) -> str | None:
    """Return a problem line if ``path`` (a directory to be created or written) cannot be
    written: a file is created and removed in it, or in its nearest existing parent (the path
    itself is not created here). None if writable."""
    p = Path(path).expanduser()
    base = _existing_ancestor(p)
    if not base.is_dir():
        return f"{key}: {base} is a file, not a directory (for {p})"
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".raydapt-write-check-"):
            pass
    except OSError as exc:
        why = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror
                                                                            or str(exc))
        where = "" if base == p.absolute() else f" (it would be created in {base})"
        return (f"{key}: cannot write to {p}{where}: {why}; choose another {key}=DIR or make "
                "it writable")
    return None


TRACKING_TIMEOUT_S = 5.0
"""How long preflight waits for the MLflow tracking server (or database) to answer."""

_DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def check_tracking(t: Any, timeout: float = TRACKING_TIMEOUT_S) -> str | None:
    """Return a problem line if the job's MLflow store cannot be used: an http(s) server that
    does not answer within ``timeout`` s, a database host:port that refuses connections, a
    sqlite / file store whose directory cannot be written. None if usable or tracking is off.
    (An answer of any HTTP status counts: authentication is MLflow's to report.)"""
    if not t.enabled:
        return None
    uri = str(t.uri)
    hint = ("; start the server, fix tracking.uri, or run without tracking: "
            "tracking.enabled=false")
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return None  # it answered
        except (urllib.error.URLError, OSError, ValueError) as exc:
            why = getattr(exc, "reason", exc)
            return (f"tracking.uri: no MLflow server answers at {uri} within {timeout:.0f} s "
                    f"({why}){hint}")
        return None
    if scheme in _DB_PORTS:
        u = urlsplit(uri)
        try:
            with socket.create_connection((u.hostname or "localhost",
                                           u.port or _DB_PORTS[scheme]), timeout=timeout):
                pass
        except OSError as exc:
            return (f"tracking.uri: the {scheme} database of the MLflow store at "
                    f"{u.hostname}:{u.port or _DB_PORTS[scheme]} does not answer "
                    f"({exc.strerror or exc}){hint}")
        return None
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            f = Path(path)
            if f.exists() and not os.access(f, os.R_OK | os.W_OK):
                return f"tracking.uri: cannot write the MLflow store {f}: permission denied"
            return check_writable("tracking.uri", f.parent)
        return None
    if scheme == "file" or not scheme:
        return check_writable("tracking.uri", uri[len("file://"):] if scheme else uri)
    return None


def check_store(key: str, uri: str) -> str | None:
    """An object-store location (``s3://bucket/prefix``) must take a probe object: write,
    read back, delete (one line naming the setting if it cannot)."""
    from raydapt.core.storage import StorageError, Store

    if key == "tracking.artifact_location" and not uri.startswith("s3://"):
        return None  # MLflow's own schemes (mlflow-artifacts:, http:, ...): its server checks
    try:
        Store(uri).check()
    except StorageError as exc:
        return f"{key}: {exc}"
    return None


def preflight(cfg: Any) -> list[str]:
    """Check every model reference and data path of a job, its output / cache / store
    directories and its tracking server, before anything starts (one error for all)."""
    problems = []
    try:
        done = check_inputs(*cfg.inputs())
    except PreflightError as exc:
        problems.append(str(exc))
        done = []
    for key, path in (("run.output_dir", cfg.run.output_dir), ("run.cache_dir", cfg.run.cache_dir),
                      ("tracking.artifact_location", cfg.tracking.artifact_location)):
        if is_uri(path):
            problems.append(check_store(key, path))
        elif key != "tracking.artifact_location":
            problems.append(check_writable(key, path))
    problems.append(check_tracking(cfg.tracking))
    problems = [p for p in problems if p]
    if problems:
        raise PreflightError(problems[0] if len(problems) == 1 else
                             f"{len(problems)} problems: " + "; ".join(problems))
    return done


@contextmanager
def checked_job(cfg: Any) -> Iterator[None]:
    """Preflight, then run the job's body. A file with no usable rows writes its rejects to
    ``<run.output_dir>/<run.name>/rejects.parquet`` and ends the job with one error line."""
    preflight(cfg)
    try:
        yield
    except NoUsableRows as exc:
        out = OutputDir(cfg.run.output_dir, cfg.run.name)
        exc.rejects.astype({"id": object}).to_parquet(out.local / "rejects.parquet")
        out.sync()
        raise DataError(f"no usable rows in {exc.file}: {len(exc.rejects)} rejected, "
                        f"see {out.where('rejects.parquet')}") from None
