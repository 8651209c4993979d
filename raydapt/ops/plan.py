"""``raydapt plan JOB.yaml``: what a job will cost, without running it.

For every stage: the rows it processes (counted in the data files; cheap), the LLM prompt tokens
(a sample of prompts rendered exactly as the engines do and tokenised with the teacher's
tokenizer, extrapolated to all rows), GPU- (or CPU-) hours from the throughput table
``raydapt/ops/plan_table.yaml`` (its header says where each number comes from), and the Ray
resources the stage requests (from the config). Plus one rendered prompt.

Methods register a planner with :func:`register`; a method without one fails with a clear
"no plan for method X yet". ``raydapt submit`` logs the plan as ``plan.*`` params of the parent
MLflow run; when the job ends, its entrypoint logs ``actual.<stage>.seconds`` (each child run's
wall time) on the same run (:func:`record_actuals`), so estimate and actual sit side by side.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from raydapt import RaydaptError
from raydapt.core.assets import load_tokenizer
from raydapt.data.readers import split_and_subsample
from raydapt.methods import METHODS, names
from raydapt.train import Steps, per_worker_batch
from raydapt.train.settings import FitTrain, LoRATrain, StudentTrain, from_section

TABLE_PATH = Path(__file__).with_name("plan_table.yaml")


class PlanError(RaydaptError):
    """No planner for a method, or a config the planner cannot size."""


@dataclass
class StagePlan:
    """One stage: rows, LLM tokens, device hours and the Ray resources it asks for."""

    name: str
    rows: int | None
    llm_tokens: int | None = None
    device: str = "cpu"              # "gpu" or "cpu": what ``hours`` counts
    hours: float | None = None       # device-hours (GPU-hours on GPUs, CPU-worker-hours on CPU)
    resources: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class Plan:
    method: str
    gpu: str
    stages: list[StagePlan]
    prompt: str = ""
    notes: list[str] = field(default_factory=list)
    prompt_header: str = "one rendered prompt (what the teacher sees, chat template included):"

    def total_hours(self, device: str) -> float:
        return sum(s.hours or 0.0 for s in self.stages if s.device == device)

    def _total_text(self, device: str, unit: str) -> str:
        """``1.234 GPU-hours``, or ``GPU-hours unknown (>= 0.078; rows of teacher, knn
        unknown)`` when a stage on that device has no estimate (its data is not here)."""
        unknown = [s.name for s in self.stages if s.device == device and s.hours is None]
        if not unknown:
            return f"{self.total_hours(device):.3f} {unit}"
        return (f"{unit} unknown (>= {self.total_hours(device):.3f}; rows of "
                f"{', '.join(unknown)} unknown)")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "gpu": self.gpu, "notes": self.notes,
                "prompt": self.prompt,
                "gpu_hours": self.total_hours("gpu"), "cpu_hours": self.total_hours("cpu"),
                "stages": [s.__dict__ for s in self.stages]}

    def mlflow_params(self) -> dict[str, str]:
        """``plan.<stage>.rows|llm_tokens|hours|device`` and totals, for the parent run."""
        out = {"plan.gpu_hours": f"{self.total_hours('gpu'):.4g}",
               "plan.cpu_hours": f"{self.total_hours('cpu'):.4g}"}
        if any(s.device == "gpu" for s in self.stages):  # the GPU type means nothing on CPU
            out["plan.gpu"] = self.gpu
        for s in self.stages:
            for k in ("rows", "llm_tokens", "hours", "device"):
                v = getattr(s, k)
                if v is not None:
                    out[f"plan.{s.name}.{k}"] = f"{v:.4g}" if isinstance(v, float) else str(v)
        return out

    def render(self) -> str:
        head = f"{'stage':<22}{'rows':>9}{'LLM tokens':>13}{'device-h':>10}  device  resources"
        lines = [f"plan for method {self.method} (GPU type {self.gpu})", head, "-" * len(head)]
        for s in self.stages:
            rows = "?" if s.rows is None else f"{s.rows:,}"
            tok = "" if s.llm_tokens is None else f"{s.llm_tokens:,}"
            hrs = "" if s.hours is None else f"{s.hours:.3f}"
            res = ", ".join(f"{k}={v}" for k, v in s.resources.items())
            lines.append(f"{s.name:<22}{rows:>9}{tok:>13}{hrs:>10}  {s.device:<6}  {res}")
            if s.note:
                lines.append(f"{'':<22}  ({s.note})")
        lines.append(f"total: {self._total_text('gpu', 'GPU-hours')}, "
                     f"{self._total_text('cpu', 'CPU-worker-hours')}")
        lines += [f"note: {n}" for n in self.notes]
        if self.prompt:
            lines += ["", self.prompt_header,
                      "-" * 60, self.prompt, "-" * 60]
        return "\n".join(lines)


def load_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def make_plan(cfg, *, gpu: str = "h100", table: dict[str, Any] | None = None) -> Plan:
    """Plan a validated job config (see module docstring)."""
    table = table or load_table()
    if gpu not in table["devices"] or gpu == "cpu":
        raise PlanError(f"unknown GPU type {gpu!r}; the table knows "
                        f"{sorted(k for k in table['devices'] if k != 'cpu')}")
    method = METHODS.get(cfg.method)
    if method is None or method.plan is None:
        raise PlanError(f"no plan for method {cfg.method!r} yet (planners: {names('plan')}); "
                        "add one to its entry in raydapt.methods")
    return method.load("plan")(cfg, table, gpu)


# --------------------------------------------------------------------------------------------
# Helpers shared by planners
# --------------------------------------------------------------------------------------------


def count_rows(path: Path, fmt: str = "auto") -> int | None:
    """Rows in a jsonl / parquet / csv file (None when the file is not on this machine)."""
    if "://" in str(path) or not path.is_file():
        return None
    kind = fmt if fmt != "auto" else path.suffix.lstrip(".").lower()
    if kind in ("parquet", "pq"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    return n - 1 if kind == "csv" else n


def sample_texts(path: Path, text_field: str, n: int = 32, fmt: str = "auto") -> list[str]:
    """The first ``n`` texts of a file (for token estimates)."""
    if "://" in str(path) or not path.is_file():
        return []
    kind = fmt if fmt != "auto" else path.suffix.lstrip(".").lower()
    import pandas as pd

    if kind in ("parquet", "pq"):
        df = pd.read_parquet(path).head(n)
    elif kind == "csv":
        df = pd.read_csv(path, nrows=n)
    else:
        rows = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
                if len(rows) >= n:
                    break
        df = pd.DataFrame(rows)
    if text_field not in df:
        return []
    return [str(t) for t in df[text_field].dropna().tolist() if str(t).strip()]


def model_params(ref: str, table: dict[str, Any]) -> tuple[float, str]:
    """(parameter count, how we know it) for a model reference."""
    name = ref.split(":", 1)[-1].split("@")[0].lower()
    for key, n in sorted(table["model_params"].items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return float(n), key
    m = re.search(r"(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", name)
    if m:
        return float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6), f"{m.group(0)} in name"
    return 7e9, "unknown size, assumed 7e9"


def resources(actors: int | tuple[int, int], cpus: float, gpus: float, **extra: Any
              ) -> dict[str, Any]:
    c = f"{actors[0]}-{actors[1]}" if isinstance(actors, (tuple, list)) else actors
    out: dict[str, Any] = {"actors": c, "CPU/actor": cpus}
    if gpus:
        out["GPU/actor"] = gpus
    out.update(extra)
    return out


def llm_stage(name: str, *, rows: int | None, tokens_per_row: float | None, params: float,
              backend: str, pool, table: dict[str, Any], gpu: str, flop_factor: float = 2.0,
              note: str = "") -> StagePlan:
    """A prefill-only LLM pass over ``rows`` prompts on an actor pool (``flop_factor`` x
    params FLOP per token: 2 for a forward pass, 6 for per-sample gradients)."""
    dev = "gpu" if pool.num_gpus else "cpu"
    kind = gpu if dev == "gpu" else "cpu"
    tokens = None if rows is None or tokens_per_row is None else int(rows * tokens_per_row)
    hours = None
    replicas = pool.concurrency[1] if isinstance(pool.concurrency, (tuple, list)) \
        else pool.concurrency
    if tokens is not None:
        flops = flop_factor * params * tokens
        rate = table["devices"][kind][f"llm_{backend}"]
        load = table["fixed_seconds"][f"llm_load_{backend}"][dev]
        # compute is spread over the replicas; every replica pays its model load once.
        # GPU: GPU-hours (x num_gpus per actor for the loads); CPU: actor-hours.
        per_actor = pool.num_gpus if dev == "gpu" else 1
        hours = (flops / rate + load * replicas * per_actor) / 3600
    return StagePlan(name, rows, tokens, dev, hours,
                     resources(pool.concurrency, pool.num_cpus, pool.num_gpus,
                               **dict(getattr(pool, "resources", None) or {}),
                               batch_size=pool.batch_size, backend=backend), note=note)


def fit_steps(settings, rows: int | None, *, name: str) -> tuple[Steps | None, str | None]:
    """A fit's :class:`~raydapt.train.Steps` on ``rows`` by the one rule the training loop
    runs (``settings.steps_for``: StudentTrain, FitTrain or LoRATrain), or (None, why) when
    the rows are unknown or no optimiser step would run."""
    if rows is None:
        return None, None
    try:
        return settings.steps_for(rows, name=name), None
    except RaydaptError as e:
        return None, str(e)


def rows_per_step(settings) -> int:
    """Rows one (micro) step of a fit consumes over all its workers."""
    w = 1 if getattr(settings, "in_process", False) else settings.num_workers
    if isinstance(settings, FitTrain):  # DALLMi: batch_size // workers rows per worker
        return per_worker_batch(settings.batch_size, w) * w
    return per_worker_batch(settings.batch_size, w, getattr(settings, "grad_accum", 1)) * w


def steps_note(steps: Steps | None, per_step: int, why: str | None, *, passes: int = 1,
               prefix: str = "") -> tuple[int | None, str | None]:
    """(examples, note) of a fit of ``steps`` steps of ``per_step`` rows (x ``passes``)."""
    if steps is None:
        return None, (f"no optimiser step would run: {why}" if why else None)
    ex = steps.total * per_step * passes
    return ex, (f"{prefix}{steps.total} steps ({steps.epochs} epochs of {steps.per_epoch}) x "
                f"{per_step} rows{' x 2 passes' if passes == 2 else ''} = {ex:,} examples")


def train_stage(name: str, *, examples: int | None, tokens_per_example: int, params: float,
                train, table: dict[str, Any], gpu: str, epochs: int | None = None,
                rows: int | None = None, seen: str | None = None) -> StagePlan:
    """One Ray Train fit: ``examples`` seen (steps x rows per step, by the one step rule; see
    :func:`fit_steps`, what ``seen`` says) at ``tokens_per_example``."""
    dev = "gpu" if train.use_gpu else "cpu"
    kind = gpu if dev == "gpu" else "cpu"
    hours = None
    if examples is not None:
        flops = 6 * params * examples * tokens_per_example
        fixed = table["fixed_seconds"]["train_fit"][dev]
        # the rate is per device; all workers hold a device for the whole fit
        wall = flops / (table["devices"][kind]["train"] * (train.num_workers if dev == "gpu"
                                                           else 1)) + fixed
        hours = wall * train.num_workers / 3600
    res = {"workers": train.num_workers, "CPU/worker": train.cpus_per_worker}
    if train.use_gpu:
        res["GPU/worker"] = 1
    res.update(dict(getattr(train, "resources", None) or {}))  # custom node-type resources
    # the rows column counts rows, as every other stage's does; epochs go to the note
    if rows is None:
        rows = examples if not epochs or examples is None else examples // epochs
    if seen is None:
        seen = (f"{epochs} epochs = {examples:,} examples" if epochs and examples is not None
                else "rows x epochs")
    note = f"{tokens_per_example} tokens/example, {seen}"
    return StagePlan(name, rows, None, dev, hours, res, note=note)


class _TokenizerFormatter:
    """The engines' PromptFormatter on a bare tokenizer (no model weights loaded)."""

    def __init__(self, t, **kwargs: Any) -> None:
        from raydapt.engines.base import PromptFormatter

        tok = load_tokenizer(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code,
                             **kwargs)
        self.header = ("one rendered prompt (what the teacher sees, chat template included):"
                       if t.chat else "one rendered prompt (what the teacher sees; teacher.chat "
                       "is false: no chat template):")
        self.fmt = PromptFormatter()
        self.fmt._init_text(tok, list(t.verbalizer.values()), model=t.model, chat=t.chat,
                            answer_prefix=t.answer_prefix, max_length=t.max_length)

    def render(self, prompt: str) -> str:
        return self.fmt.format(prompt)

    def n_tokens(self, prompts: list[str]) -> list[int]:
        return [len(x) for x in self.fmt.tokenize(prompts)["input_ids"]]

    def truncate(self, text: str, n: int, side: str = "head") -> str:
        return self.fmt.truncate(text, n, side)


class _CharFormatter:
    """Fallback when the tokenizer cannot be loaded here (e.g. a hub model, offline):
    ~4 characters per token; the chat turns shown schematically (the real template is the
    tokenizer's)."""

    def __init__(self, t) -> None:
        self.t = t
        self.header = ("one prompt (the teacher's tokenizer is not available here: "
                       + ("chat turns shown schematically, not the model's chat template):"
                          if t.chat else "no chat template, as teacher.chat is false):"))

    def render(self, prompt: str) -> str:
        if self.t.chat:
            return f"[user]\n{prompt}\n[assistant]\n{self.t.answer_prefix}"
        return prompt + self.t.answer_prefix

    def n_tokens(self, prompts: list[str]) -> list[int]:
        return [min(self.t.max_length, math.ceil(len(self.render(p)) / 4)) for p in prompts]

    def truncate(self, text: str, n: int, side: str = "head") -> str:
        if len(text) <= 4 * n:
            return text
        return {"head": text[: 4 * n], "tail": text[-4 * n:]}.get(
            side, text[: 2 * n] + " ... " + text[-2 * n:])


def hub_offline(timeout: float = 1.5) -> str | None:
    """Why the Hugging Face hub cannot be reached from here (HF_HUB_OFFLINE /
    TRANSFORMERS_OFFLINE set, or no connection to its host within ``timeout``), else None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        return f"{host} unreachable ({type(exc).__name__})"
    return None


def formatter(teacher, notes: list[str]):
    kwargs: dict[str, Any] = {}
    if str(teacher.model).startswith("hf:"):
        why = hub_offline()
        if why:  # a cached tokenizer still loads; otherwise no hub retries (64 s) before the
            kwargs["local_files_only"] = True  # fallback
            notes.append(f"Hugging Face hub offline ({why}): the teacher tokenizer only from "
                         "the local cache")
    try:
        return _TokenizerFormatter(teacher, **kwargs)
    except Exception as exc:
        notes.append(f"teacher tokenizer not available here ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:160]}); tokens estimated as characters / 4")
        return _CharFormatter(teacher)


# --------------------------------------------------------------------------------------------
# SimDA
# --------------------------------------------------------------------------------------------


def plan_simda(cfg, table: dict[str, Any], gpu: str) -> Plan:
    from raydapt.stages.annotate import build_prompt

    notes: list[str] = []
    d, t, a, dist = cfg.data, cfg.teacher, cfg.annotate, cfg.distill
    root = Path(d.root)
    n_src_file = count_rows(root / d.source.path, d.source.format)
    n_tgt_file = count_rows(root / d.target.path, d.target.format)
    for what, n, p in (("source", n_src_file, d.source.path), ("target", n_tgt_file, d.target.path)):
        if n is None:
            notes.append(f"{what} file {root / p} is not on this machine: its rows are unknown")

    def cap(n: float | None, m: int | None) -> int | None:
        return None if n is None else int(min(round(n), m) if m else round(n))

    n_src = cap(n_src_file, d.max_source_rows)
    n_tr = cap(None if n_tgt_file is None else n_tgt_file * (1 - d.target_test_fraction),
               d.max_target_train_rows)
    n_te = cap(None if n_tgt_file is None else n_tgt_file * d.target_test_fraction,
               d.max_target_test_rows)
    notes.append("row counts are before rejects; the target split is by a seeded id hash, so "
                 "train/test sizes are expected values")

    def add(*xs: int | None) -> int | None:
        return None if any(x is None for x in xs) else int(sum(xs))  # type: ignore[arg-type]

    fmt = formatter(t, notes)
    texts = sample_texts(root / d.source.path, d.source.text_field, fmt=d.source.format) or \
        sample_texts(root / d.target.path, d.target.text_field, fmt=d.target.format) or \
        ["An example review text."]
    words = [w.strip() for w in t.verbalizer.values()]
    plain = [build_prompt(t.template, fmt.truncate(x, t.text_max_tokens, t.text_truncation))
             for x in texts]
    k = a.prompt_k
    demo = [build_prompt(t.template, fmt.truncate(x, t.text_max_tokens, t.text_truncation),
                         demos=[(fmt.truncate(texts[(i + j + 1) % len(texts)], t.demo_max_tokens),
                                 words[(i + j) % len(words)]) for j in range(k)],
                         demo_template=t.demo_template) for i, x in enumerate(texts)]
    tok_plain = sum(fmt.n_tokens(plain)) / len(plain)
    tok_demo = sum(fmt.n_tokens(demo)) / len(demo)
    prompt = fmt.render(plain[0])
    params, how = model_params(t.model, table)
    notes.append(f"teacher {t.model}: {params:.3g} parameters ({how}); {tok_plain:.0f} tokens per "
                 f"zero-shot prompt, {tok_demo:.0f} with {k} demonstrations (mean of "
                 f"{len(texts)} sampled rows)")

    stages = [StagePlan("read", add(n_src_file, n_tgt_file), note="driver + Ray Data read")]
    stages.append(llm_stage("teacher", rows=add(n_src, n_tr, n_te), tokens_per_row=tok_plain,
                            params=params, backend="hf", pool=t.pool, table=table, gpu=gpu))
    if t.backend == "vllm":
        stages[-1].note = "keys need hidden states: this pass runs on the hf engine"
    if a.select_on_dev and d.dev is not None:  # k / tau / lam chosen on a labelled third domain
        n_dev = cap(count_rows(root / d.dev.path, d.dev.format), d.max_dev_rows)
        if n_dev is None:
            notes.append(f"dev file {root / d.dev.path} is not on this machine: its rows are "
                         "unknown")
        stages.append(llm_stage("teacher-dev", rows=n_dev, tokens_per_row=tok_plain,
                                params=params, backend="hf", pool=t.pool, table=table, gpu=gpu))
    stages.append(StagePlan("knn", add(n_tr, n_te), resources={"actors": 1, "CPU/actor": 0.25},
                            note=f"FAISS {a.index} over {n_src} keys, k={a.k}"))
    n_b = None if n_te is None else (min(n_te, a.baseline_max_rows) if a.baseline_max_rows
                                     else n_te)
    n_prompted = 0 if n_b is not None else None
    if n_b is not None:
        n_prompted += n_b if "icl_random" in a.baselines else 0
        n_prompted += n_b if {"icl_nearest", "knn_prompt"} & set(a.baselines) else 0
    if a.teacher_prompt == "knn_prompt":
        n_prompted = add(n_prompted, n_tr)
    if n_prompted != 0:
        stages.append(llm_stage("prompted", rows=n_prompted, tokens_per_row=tok_demo,
                                params=params, backend=t.backend, pool=t.pool, table=table,
                                gpu=gpu))
    s_params, s_how = model_params(dist.student, table)
    # the students' steps by the rule their loop runs (StudentTrain.steps_for): step-matched
    # students get distill.steps, or `epochs` epochs over the target-train rows; each cycles
    # its own rows for them; source_only_all makes `epochs` passes over the source rows
    st = from_section(StudentTrain, dist, min_confidence=0.0)
    matched, why = (st.steps, None) if st.steps else (None, None)
    if matched is None:
        m, why = fit_steps(st, n_tr, name="distill")
        matched = m and m.total
    for v in dist.variants:
        n_v = n_src if v in ("source_only", "source_only_all") else n_tr
        if v == "source_only_all":
            steps, err = fit_steps(replace(st, steps=None), n_v, name=f"student-{v}")
        elif matched is None:
            steps, err = None, why
        else:
            steps, err = fit_steps(replace(st, steps=matched), n_v, name=f"student-{v}")
        ex, seen = steps_note(steps, rows_per_step(st), err,
                              prefix="" if v == "source_only_all" else "step-matched: ")
        stages.append(train_stage(f"student-{v}", examples=ex, tokens_per_example=dist.max_length,
                                  params=s_params, train=dist, table=table, gpu=gpu,
                                  epochs=dist.epochs, rows=n_v, seen=seen))
    notes.append(f"student {dist.student}: {s_params:.3g} parameters ({s_how})")
    return Plan("simda", gpu, stages, prompt=prompt, notes=notes, prompt_header=fmt.header)


def record_actuals(uri: str, parent_run_id: str) -> dict[str, float]:
    """After a run: log ``actual.<stage>.seconds`` (each child run's wall time) on the parent run,
    next to the ``plan.<stage>.*`` params :mod:`raydapt.ops.submit` logged before it started."""
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(tracking_uri=uri)
    parent = cl.get_run(parent_run_id)
    kids = cl.search_runs([parent.info.experiment_id],
                          filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                          max_results=1000)
    out = {f"actual.{r.data.tags.get('mlflow.runName', r.info.run_id[:8])}.seconds":
           (r.info.end_time - r.info.start_time) / 1000.0
           for r in kids if r.info.end_time and r.info.start_time}
    if out:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        cl.log_batch(parent_run_id, metrics=[Metric(k, v, ts, 0) for k, v in out.items()])
    return out


# --------------------------------------------------------------------------------------------
# DALLMi and NTK-Selector: simpler plans (no LLM prompts; sizes from the files and the config)
# --------------------------------------------------------------------------------------------


def _domain_ids(path: Path, field: str, id_field: str) -> dict[str, list[str]] | None:
    """Row ids per value of ``field`` in a jsonl file (one json parse per line; None
    elsewhere), so the plan can apply the job's own seeded split to them."""
    if "://" in str(path) or not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
        return None
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f):
            if line.strip():
                try:
                    r = json.loads(line)
                    v = str(r.get(field))
                except (json.JSONDecodeError, AttributeError):
                    continue
                out.setdefault(v, []).append(str(r.get(id_field, f"line-{n}")))
    return out


def plan_dallmi(cfg, table: dict[str, Any], gpu: str) -> Plan:
    d, notes = cfg.data, []
    path = Path(d.root) / d.path
    ids = _domain_ids(path, d.domain_field, d.id_field)
    counts = None if ids is None else {k: len(v) for k, v in ids.items()}
    if ids is None:
        notes.append(f"{path}: not a jsonl file on this machine; rows unknown")
        n_src = n_tr = n_te = None
    else:  # the job's own seeded id-hash split and caps (rejects aside): the rows it will use
        def split(domains: list[str], **caps) -> tuple[int, int]:
            import pandas as pd

            df = pd.DataFrame({"id": [i for x in domains for i in ids.get(x, [])]})
            a, b = split_and_subsample(df.drop_duplicates("id"), seed=cfg.run.seed,
                                       test_fraction=d.test_fraction, **caps)
            return len(a), len(b)

        n_src, _ = split(d.source_domains, max_rows=d.max_source_rows)
        n_tr, n_te = split(d.target_domains, max_rows=d.max_target_train_rows,
                           max_test_rows=d.max_target_test_rows)
    params, how = model_params(cfg.model.encoder, table)
    notes.append(f"encoder {cfg.model.encoder}: {params:.3g} parameters ({how}); training FLOP "
                 "= 6 x params x rows x epochs x max_length; dallmi / aad fits x2 for the "
                 "extra MixUp / discriminator passes")
    stages = [StagePlan("read", counts and sum(counts.values()), note="driver")]
    # steps by the rule the loop runs (FitTrain.steps_for)
    src = from_section(FitTrain, cfg.source)
    steps, why = fit_steps(src, n_src, name="source")
    ex, seen = steps_note(steps, rows_per_step(src), why)
    stages.append(train_stage("source", examples=ex,
                              tokens_per_example=cfg.source.max_length, params=params,
                              train=cfg.source, table=table, gpu=gpu, rows=n_src,
                              epochs=cfg.source.epochs, seen=seen))
    adapt = from_section(FitTrain, cfg.adapt)
    for m in cfg.methods:
        if m == "no_adapt":
            continue
        factor = 2 if m in ("dallmi", "dallmi_log", "aad") else 1
        steps, why = fit_steps(adapt, n_tr, name=f"adapt-{m}")
        ex, seen = steps_note(steps, rows_per_step(adapt), why, passes=factor)
        stages.append(train_stage(
            f"adapt-{m}", examples=ex, tokens_per_example=cfg.adapt.max_length, params=params,
            train=cfg.adapt, table=table, gpu=gpu, rows=n_tr, epochs=cfg.adapt.epochs,
            seen=seen))
    stages.append(StagePlan("evaluate", n_te and n_te * len(cfg.methods),
                            note="test rows x methods, forward only"))
    return Plan("dallmi", gpu, stages, notes=notes)


def plan_ntk_select(cfg, table: dict[str, Any], gpu: str) -> Plan:
    d, s, f, notes = cfg.data, cfg.select, cfg.format, []
    root = Path(d.root)
    # every file of the pool (a data.pool entry may be a directory or a glob)
    pool_counts = [count_rows(x.path) for x in cfg.inputs()[1] if x.key.startswith("data.pool")]
    pool = None if None in pool_counts else sum(pool_counts)  # type: ignore[arg-type]
    if pool is None:
        notes.append("a pool file is not on this machine: pool rows unknown")
    if pool is not None and d.max_pool_rows:
        pool = min(pool, d.max_pool_rows)
    n_d = sum(t.domain_rows for t in d.tasks)
    # eval_rows None = every test item: the task's rows minus its domain rows
    n_eval = sum(t.eval_rows if t.eval_rows is not None else
                 max(0, (count_rows(root / t.path) or 0) - t.domain_rows) for t in d.tasks)
    n_sel, m = s.sizes(n_d, pool)  # the recipe's N and M
    params, how = model_params(cfg.model, table)
    tok = f.max_length
    notes.append(f"model {cfg.model}: {params:.3g} parameters ({how}); tokens per row taken as "
                 f"format.max_length = {tok} (an upper bound); LoRA fits counted at the full "
                 "6 x params FLOP per token")
    runs = len(s.selectors) + len(s.baselines)
    # micro steps by the rule the loop runs (LoRATrain.steps_for)
    warm, fine = from_section(LoRATrain, cfg.warmup), from_section(LoRATrain, cfg.finetune)
    steps, why = fit_steps(warm, n_d, name="warmup")
    ex, seen = steps_note(steps, rows_per_step(warm), why)
    stages = [
        StagePlan("read", None if pool is None else pool + n_d + n_eval, note="driver"),
        train_stage("warmup", examples=ex, tokens_per_example=tok,
                    params=params, train=cfg.warmup, table=table, gpu=gpu, rows=n_d,
                    epochs=cfg.warmup.epochs, seen=seen),
        llm_stage("embed", rows=None if pool is None else pool + n_d, tokens_per_row=tok,
                  params=params, backend="hf", pool=s.embed_pool, table=table, gpu=gpu),
        llm_stage("grad", rows=None if m is None else m + n_d, tokens_per_row=tok, params=params,
                  backend="hf", pool=s.grad_pool, table=table, gpu=gpu, flop_factor=6.0,
                  note=f"per-sample gradients of M={m} candidates + |D|={n_d}, "
                  f"projected to p={s.proj_dim}"),
    ]
    for sel in [*s.selectors, *[b for b in s.baselines if b == "domain_only"]]:
        rows = n_d + (0 if sel == "domain_only" else n_sel)
        steps, why = fit_steps(fine, rows, name=f"finetune-{sel}")
        ex, seen = steps_note(steps, rows_per_step(fine), why)
        stages.append(train_stage(f"finetune-{sel}", examples=ex,
                                  tokens_per_example=tok, params=params, train=cfg.finetune,
                                  table=table, gpu=gpu, rows=rows, epochs=cfg.finetune.epochs,
                                  seen=seen))
    stages.append(llm_stage("eval", rows=n_eval * runs, tokens_per_row=cfg.eval.max_length,
                            params=params, backend="hf", pool=cfg.eval.pool, table=table,
                            gpu=gpu, note=f"{n_eval} items x {runs} models"))
    return Plan("ntk_select", gpu, stages, notes=notes)


# --------------------------------------------------------------------------------------------
# Node types: where each stage lands on a cluster (cluster/node_types.yaml)
# --------------------------------------------------------------------------------------------

_PER_UNIT = {"CPU/actor": "CPU", "CPU/worker": "CPU", "GPU/actor": "GPU", "GPU/worker": "GPU"}
_NOT_RESOURCES = {"actors", "workers", "batch_size", "backend", "on"}


def stage_request(s: StagePlan) -> dict[str, float] | None:
    """The Ray resources one actor / worker of a planned stage asks for; None for a stage that
    runs in the job driver (no resources)."""
    if not s.resources:
        return None
    req: dict[str, float] = {}
    for k, v in s.resources.items():
        if k in _PER_UNIT:
            req[_PER_UNIT[k]] = float(v)
        elif k not in _NOT_RESOURCES and isinstance(v, (int, float)):
            req[k] = float(v)
    return req


def place_on_node_types(plan: Plan, cfg=None, which: str = "cloud") -> Plan:
    """Add ``on=<node types>`` to each stage's resources: the node types of
    ``cluster/node_types.yaml`` (``cloud`` or ``local`` half) one of its actors / workers fits
    on (the head, CPU: 0, runs only the driver). A stage no node type can run gets
    ``on=NONE`` and a note naming the resource, as ``raydapt submit`` would refuse it."""
    from raydapt.ops import node_types as ntm

    nt = ntm.local() if which == "local" else ntm.cloud()
    for s in plan.stages:
        req = stage_request(s)
        if req is None:
            s.resources["on"] = f"{nt.head} (driver)"
            continue
        fit = [n for n in nt.fitting(req) if n != nt.head] or nt.fitting(req)
        if fit:
            s.resources["on"] = "|".join(fit)
        else:
            missing = sorted(k for k, v in req.items()
                             if not any(nt.offered(n).get(k, 0.0) >= v for n in nt.types))
            s.resources["on"] = "NONE"
            plan.notes.append(f"stage {s.name} asks for "
                              f"{', '.join(f'{k}={req[k]:g}' for k in missing)}, which no "
                              f"{nt.where} node type offers ({nt.describe()})")
    plan.notes.append(f"node types: {nt.where} half of cluster/node_types.yaml "
                      f"({', '.join(nt.types)}; the head runs only the job driver)")
    return plan
