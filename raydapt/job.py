"""The shape every recipe has and the context it runs in.

:class:`Recipe` is the one recipe shape (torchtune's recipe classes are the model): a recipe is a
subclass with its typed state as annotated attributes (each set by one step), a ``run()`` that
lists the named steps in order, and the ``STAGE_VERSIONS`` of the cached stages it owns;
``Recipe.main(cfg)`` opens the :func:`job_context` (seed, output directory, stage cache, Ray, the
MLflow parent run with the job's params and resolved config, the results writer, ``say``:
timestamped progress lines) and runs it. :func:`cached_stage` is the one "cached stage in a
child run" step. Below this module sit config and core."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from raydapt.config import JobBase, config_hash, to_yaml
from raydapt.core.cache import StageCache
from raydapt.core.runtime import init_ray_for, seed_everything, verbose
from raydapt.core.storage import OutputDir, s3_env_for_mlflow
from raydapt.core.tracking import RunLogger, Tracker, flatten


def speaker(tag: str) -> Callable[[str], None]:
    """``say(msg)`` printing ``[tag HH:MM:SS] msg`` (flushed: Ray job logs stream it)."""
    def say(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    return say


@dataclass
class JobContext:
    cfg: Any
    out: Path
    cache: StageCache
    tracker: Tracker
    parent: RunLogger
    say: Callable[[str], None]
    t_job: float
    requested: dict[str, str]  # the job file's values of the keys chosen at run time
    output: OutputDir | None = None  # ``out``'s store when run.output_dir is a URI

    def seconds(self) -> float:
        return time.time() - self.t_job

    def record_config(self, cfg: JobBase) -> None:
        """The config that runs, once the recipe has made its run-time choices
        (:meth:`JobBase.chosen_at_run_time`): the chosen values become the parent run's params
        under their own keys (the job file's values are already there as ``<key>.requested``),
        and ``config.yaml`` (file and artifact) is rewritten with them. Call it once, after the
        last choice; ``self.cfg`` is then the config that ran."""
        self.cfg = cfg
        chosen = flatten(cfg.model_dump(mode="json"))
        self.parent.params({k: chosen[k] for k in cfg.chosen_at_run_time()})
        _write_config(cfg, self.out, self.parent, requested=self.requested)
        self.sync()

    def write_results(self, summary: dict[str, Any]) -> Path:
        """``results.json`` in the run's output directory (uploaded at once on a URI)."""
        path = self.out / "results.json"
        path.write_text(json.dumps(summary, indent=2))
        self.sync()
        return path

    def sync(self) -> None:
        """On a URI ``run.output_dir``: upload what the job wrote into :attr:`out` so far."""
        if self.output is not None:
            self.output.sync()


def run_description(cfg: JobBase) -> dict[str, str]:
    """``mlflow.note.content`` (the run page's description): the job YAML's header comment."""
    header = getattr(cfg, "_header", "")
    # markdown: keep the comment's line breaks
    return {"mlflow.note.content": header.replace("\n", "  \n")} if header else {}


def _write_config(cfg: JobBase, out: Path, parent: RunLogger, *,
                  requested: dict[str, str] | None = None) -> str:
    """``config.yaml`` (secrets masked) into the output directory and the parent run; with
    ``requested``, a closing comment lists the job file's values of the keys chosen at run
    time."""
    text = to_yaml(cfg)
    if requested:
        chosen = flatten(cfg.model_dump(mode="json"))
        def one_line(v: str) -> str:
            return v.replace("\\", "\\\\").replace("\n", "\\n")

        text += "# chosen at run time (the job file asked for):\n" + "".join(
            f"#   {k}: {one_line(chosen[k])}  (requested {one_line(v)})\n"
            for k, v in requested.items())
    parent.text(text, "config.yaml")
    (out / "config.yaml").write_text(text)
    return text


@contextmanager
def job_context(cfg: JobBase, *, ray: bool = True,
                stage_versions: Mapping[str, int] | None = None) -> Iterator[JobContext]:
    """Seed everything, create ``<output_dir>/<name>``, start (or join) Ray unless ``ray`` is
    False, open the parent MLflow run with the config as params and ``config.yaml`` artifact.

    Keys the recipe chooses while it runs (:meth:`JobBase.chosen_at_run_time`) are logged as
    ``<key>.requested`` here and under their own name by :meth:`JobContext.record_config`
    once chosen, so the params never show a value that did not run."""
    say = speaker(cfg.method)
    seed_everything(cfg.run.seed)
    # a URI output_dir: the job writes into a local mirror, uploaded as it goes (OutputDir)
    output = OutputDir(cfg.run.output_dir, cfg.run.name)
    out = output.local
    cache = StageCache(cfg.run.cache_dir, versions=stage_versions)
    s3_env_for_mlflow(cfg.tracking.artifact_location)
    if ray:
        init_ray_for(cfg.ray)
    tracker = Tracker.from_section(cfg.tracking)
    t_job = time.time()
    with tracker.job(cfg.run.name, tags={"raydapt.method": cfg.method,
                                         "raydapt.config_hash": config_hash(cfg),
                                         **run_description(cfg)}) as parent:
        params = flatten(cfg.model_dump(mode="json"))
        requested = {k: params.pop(k) for k in cfg.chosen_at_run_time()}
        parent.params({**params, **{f"{k}.requested": v for k, v in requested.items()}})
        text = _write_config(cfg, out, parent)
        output.sync()
        # the path only (the whole YAML with --verbose): the console stays readable
        say("resolved config: " + (f"\n{text}" if verbose() else output.where("config.yaml")))
        try:
            yield JobContext(cfg=cfg, out=out, cache=cache, tracker=tracker, parent=parent,
                             say=say, t_job=t_job, requested=requested,
                             output=output if output.remote else None)
        except BaseException:
            if output.remote:  # what the failed job wrote, for its post-mortem; never masks
                try:
                    output.sync()
                except Exception as exc:  # noqa: BLE001 - the job's own error matters more
                    say(f"could not upload the outputs to {output.uri}: {exc}")
            raise
        if output.remote:
            n = output.sync()
            say(f"outputs in {output.uri} ({n} files uploaded at the end)")


T = TypeVar("T")


def cached_stage(cache: StageCache, tracker: Tracker, stage: str, parts: dict[str, Any], *,
                 compute: Callable[[Path, RunLogger], None], load: Callable[[Path, RunLogger], T],
                 run_name: str | None = None, tags: dict[str, str] | None = None,
                 params: dict[str, Any] | None = None, say: Callable[[str], None] | None = None,
                 label: str | None = None) -> T:
    """One cached stage in its own MLflow child run (``run_name``, default the stage): the
    stage's directory by content (``parts``); ``compute(dir, run_log)`` writes into it unless a
    finished output is there, then the directory is committed; ``load(dir, run_log)`` reads the
    result either way. ``params`` go to the child run in both cases; ``say`` (with ``label``)
    prints ``<label>: cached (<dir>)`` when nothing is computed."""
    d, done = cache.get(stage, parts)
    with tracker.child(run_name or stage, tags=tags) as run_log:
        if params:
            run_log.params(params)
        if done:
            if say is not None:
                say(f"{label or run_name or stage}: cached ({cache.where(d)})")
        else:
            compute(d, run_log)
            cache.commit(d)
        return load(d, run_log)


class Recipe:
    """The shape of every recipe. A subclass declares:

    - ``STAGE_VERSIONS``: the code version of every cached stage it owns (bump one when its
      code changes what it writes);
    - its typed state: annotated attributes, each set by exactly one step;
    - ``run()``: the named steps in order, ending in the report, which returns the summary
      also written to ``results.json``.

    ``Recipe.main(cfg)`` (the method registry's ``run``) opens the job context and runs it.
    Steps read ``self.cfg`` (the config that runs: a step that chooses a setting at run time
    calls :meth:`choose`) and the context ``self.ctx`` (cache, tracker, parent run, output
    directory)."""

    STAGE_VERSIONS: ClassVar[dict[str, int]] = {}

    def __init__(self, cfg: JobBase, ctx: JobContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.say = ctx.say

    @classmethod
    def needs_ray(cls, cfg: JobBase) -> bool:
        """Whether the job starts (or joins) Ray; every recipe but in-process DALLMi does."""
        return True

    @classmethod
    def main(cls, cfg: JobBase) -> dict[str, Any]:
        """Run the job: its context, then :meth:`run`; returns the summary."""
        with job_context(cfg, ray=cls.needs_ray(cfg), stage_versions=cls.STAGE_VERSIONS) as ctx:
            return cls(cfg, ctx).run()

    def run(self) -> dict[str, Any]:
        raise NotImplementedError

    def choose(self, section: str, **values: Any) -> None:
        """Set settings of ``self.cfg.<section>`` chosen at run time (the one way a step
        changes the config; :meth:`record_config` then records the config that ran)."""
        sec = getattr(self.cfg, section)
        self.cfg = self.cfg.model_copy(update={section: sec.model_copy(update=values)})

    def record_config(self) -> None:
        """After the last run-time choice: MLflow params and ``config.yaml`` say what runs."""
        self.ctx.record_config(self.cfg)

    def cached_stage(self, stage: str, parts: dict[str, Any], **kw: Any) -> Any:
        """:func:`cached_stage` on this job's cache and tracker, printing through ``say``."""
        return cached_stage(self.ctx.cache, self.ctx.tracker, stage, parts, say=self.say, **kw)
