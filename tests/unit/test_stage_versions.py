"""Every stage a recipe caches has a code version, declared by the recipe that owns it; the
stages that had none before keep the version they silently had (1), so existing cache entries
stay valid."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from raydapt.core.cache import StageCache, stage_key
from raydapt.recipes import dallmi, ntk_select, simda

RECIPES = Path(__file__).resolve().parents[2] / "raydapt" / "recipes"
OWNERS = {"simda": simda, "dallmi": dallmi, "ntk_select": ntk_select}


@pytest.mark.parametrize("name", sorted(OWNERS))
def test_every_cached_stage_has_a_version_in_its_recipe(name):
    mod = OWNERS[name]
    src = (RECIPES / f"{name}.py").read_text()
    arg = r'(?:[\w.]+\([^)]*\)|[\w.]+)'  # a name or a call, e.g. StageCache(...)
    literal = set(re.findall(r'cache\.get\(\s*"([^"]+)"', src))
    literal |= set(re.findall(rf'cached_stage\(\s*{arg},\s*{arg},\s*"([^"]+)"', src))
    # sharded passes: sharded_pass(cache, tracker, "<stage>", ...) and SimDA's _teacher_rows
    sharded = set(re.findall(r'(?:sharded|stream)_pass\(\s*[\w.]+,\s*[\w.]+,\s*"([^"]+)"', src))
    sharded |= set(re.findall(r'_teacher_rows\(\s*"([^"]+)"', src))
    sharded |= set(re.findall(r'write_rows\(\s*[\w.]+,\s*"([^"]+)"', src))  # a fit's rows
    fits = {"lora"} if name == "ntk_select" else set()  # fit_lora_cached(stage="lora")
    kinds = {f"scores-{k}" for k in ("ntk", "less")} if name == "ntk_select" else set()
    used = literal | sharded | fits | kinds
    assert used, name
    assert used <= set(mod.STAGE_VERSIONS), used - set(mod.STAGE_VERSIONS)
    assert mod.STAGE_VERSIONS is getattr(mod, [c for c in dir(mod) if c.endswith("Recipe")
                                               and c != "Recipe"][0]).STAGE_VERSIONS
    if name == "simda":
        assert {"teacher", "prompted", "template", "teacher-dev", "student-rows"} <= used
    if name == "ntk_select":
        assert "lora-rows" in used


def test_no_stage_is_owned_by_two_recipes():
    names = [set(m.STAGE_VERSIONS) for m in OWNERS.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


def test_keys_unchanged_for_stages_that_had_no_version(tmp_path):
    parts = {"a": 1, "rows": [1, 2]}
    cache = StageCache(tmp_path, versions={**dallmi.STAGE_VERSIONS,
                                           **ntk_select.STAGE_VERSIONS})
    for stage in ("dallmi_source", "lora", "grads-domain", "eval"):
        blob = json.dumps({"stage": stage, "v": 1, **parts}, sort_keys=True, default=str)
        assert cache.key(stage, parts) == hashlib.sha256(blob.encode()).hexdigest()[:16]
        assert stage_key(stage, 1, parts) == cache.key(stage, parts)
    # NTK's pool stages were bumped when they moved to streamed shards (issue 25): old
    # entries are not read as new ones
    for stage in ("embed", "scores-ntk", "scores-less"):
        assert ntk_select.STAGE_VERSIONS[stage] == 2
        assert cache.key(stage, parts) != stage_key(stage, 1, parts)


def test_unknown_stage_is_an_error(tmp_path):
    with pytest.raises(KeyError, match="STAGE_VERSIONS"):
        StageCache(tmp_path, versions=simda.STAGE_VERSIONS).get("no-such-stage", {})
