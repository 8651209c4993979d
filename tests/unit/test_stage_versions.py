"""Every stage the recipes cache has a code version; the stages that had none before keep the
version they silently had (1), so existing cache entries stay valid."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from raydapt.core.cache import STAGE_VERSIONS, stage_key

RECIPES = Path(__file__).resolve().parents[2] / "raydapt" / "recipes"


def test_every_cached_stage_has_a_version():
    src = "\n".join(p.read_text() for p in RECIPES.glob("*.py"))
    literal = set(re.findall(r'cache\.get\("([^"]+)"', src))
    # sharded passes: sharded_pass(cache, tracker, "<stage>", ...)
    sharded = set(re.findall(r'sharded_pass\(\s*[\w.]+,\s*[\w.]+,\s*"([^"]+)"', src))
    assert {"teacher", "prompted", "template", "teacher-dev"} <= sharded
    kinds = {f"scores-{k}" for k in ("ntk", "less")}  # cache.get(f"scores-{kind}", ...)
    fits = {"lora"}  # ntk_select._fit(stage="lora")
    assert literal and literal | kinds | fits | sharded <= set(STAGE_VERSIONS)


def test_keys_unchanged_for_stages_that_had_no_version():
    parts = {"a": 1, "rows": [1, 2]}
    for stage in ("dallmi_source", "lora", "embed", "grads-domain", "scores-ntk", "scores-less",
                  "eval"):
        blob = json.dumps({"stage": stage, "v": 1, **parts}, sort_keys=True, default=str)
        assert stage_key(stage, parts) == hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_unknown_stage_is_an_error():
    with pytest.raises(KeyError, match="STAGE_VERSIONS"):
        stage_key("no-such-stage", {})
