"""The methods raydapt runs: one registry, read by the CLI, the config loader, ``raydapt plan``,
``raydapt sweep`` and ``raydapt submit``.

Each entry names where a method's pieces live, as ``module:attribute`` references resolved on
first use, so ``raydapt --help`` or ``raydapt config show`` never import torch or Ray, and this
module imports nothing else from raydapt (it sits below everything that dispatches on a method):

- ``config``: the job config class (a :class:`raydapt.config.JobBase`), ``method: <name>`` in YAML;
- ``run``: ``run(cfg) -> summary``, the recipe;
- ``plan``: ``plan(cfg, table, gpu) -> Plan`` for ``raydapt plan`` (None: not planned yet);
- ``trial``: ``trial(cfg, report, run_log)`` for one ``raydapt sweep`` trial (None: not
  sweepable); ``report(dict)`` once per epoch or once at the end;
- ``sweep_setup``: ``setup(cfg, tracker)``, shared cached work run once before the trials.

A new method is one config module and one recipe module under ``raydapt/recipes/``, one entry
here, and its jobs under ``jobs/<name>/``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    config: str
    run: str
    plan: str | None = None
    trial: str | None = None
    sweep_setup: str | None = None

    def load(self, part: str) -> Any:
        """The object behind one of the references (``config``, ``run``, ...), imported now."""
        ref = getattr(self, part)
        if ref is None:
            raise LookupError(f"method {self.name!r} has no {part}")
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("simda", config="raydapt.recipes.simda_config:SimDAJob", run="raydapt.recipes.simda:run",
           plan="raydapt.ops.plan:plan_simda", trial="raydapt.recipes.simda:sweep_trial"),
    Method("dallmi", config="raydapt.recipes.dallmi_config:DALLMiJob", run="raydapt.recipes.dallmi:run",
           plan="raydapt.ops.plan:plan_dallmi", trial="raydapt.recipes.dallmi:trial",
           sweep_setup="raydapt.recipes.dallmi:prepare_for_sweep"),
    Method("ntk_select", config="raydapt.recipes.ntk_select_config:NTKSelectJob",
           run="raydapt.recipes.ntk_select:run", plan="raydapt.ops.plan:plan_ntk_select"),
)}


def names(part: str = "config") -> list[str]:
    """Sorted names of the methods that have ``part`` (e.g. ``trial``: the sweepable ones)."""
    return sorted(n for n, m in METHODS.items() if getattr(m, part) is not None)


def config_classes() -> dict[str, type]:
    """``{method name: job config class}`` in registry order."""
    return {n: m.load("config") for n, m in METHODS.items()}
