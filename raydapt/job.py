"""The context every recipe runs in: seed, output directory, stage cache, Ray, the MLflow parent
run with the job's params and resolved config, the results writer, and ``say`` (timestamped
progress lines). Recipes open it with :func:`job_context`; below it sit config and core."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydapt.config import JobBase, config_hash, to_yaml
from raydapt.core.cache import StageCache
from raydapt.core.runtime import init_ray, seed_everything, verbose
from raydapt.core.tracking import RunLogger, Tracker


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

    def seconds(self) -> float:
        return time.time() - self.t_job

    def write_results(self, summary: dict[str, Any]) -> Path:
        """``results.json`` in the run's output directory."""
        path = self.out / "results.json"
        path.write_text(json.dumps(summary, indent=2))
        return path


def run_description(cfg: JobBase) -> dict[str, str]:
    """``mlflow.note.content`` (the run page's description): the job YAML's header comment."""
    header = getattr(cfg, "_header", "")
    # markdown: keep the comment's line breaks
    return {"mlflow.note.content": header.replace("\n", "  \n")} if header else {}


@contextmanager
def job_context(cfg: JobBase, *, ray: bool = True) -> Iterator[JobContext]:
    """Seed everything, create ``<output_dir>/<name>``, start (or join) Ray unless ``ray`` is
    False, open the parent MLflow run with the config as params and ``config.yaml`` artifact."""
    say = speaker(cfg.method)
    seed_everything(cfg.run.seed)
    out = Path(cfg.run.output_dir) / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(cfg.run.cache_dir)
    if ray:
        init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.progress)
    tracker = Tracker.from_section(cfg.tracking)
    t_job = time.time()
    with tracker.job(cfg.run.name, tags={"raydapt.method": cfg.method,
                                         "raydapt.config_hash": config_hash(cfg),
                                         **run_description(cfg)}) as parent:
        parent.params(cfg.model_dump(mode="json"))
        text = to_yaml(cfg)  # secrets masked
        parent.text(text, "config.yaml")
        (out / "config.yaml").write_text(text)
        # the path only (the whole YAML with --verbose): the console stays readable
        say("resolved config: " + (f"\n{text}" if verbose() else str(out / "config.yaml")))
        yield JobContext(cfg=cfg, out=out, cache=cache, tracker=tracker, parent=parent, say=say,
                         t_job=t_job)
