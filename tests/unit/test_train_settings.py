"""Every training setting is defined once (issue 27): the job sections and the typed settings
their fits receive (raydapt.train.settings) have the same fields and the same defaults, and
`from_section` is the one way from one to the other. A field added, renamed or given another
default on one side only fails here."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest
from pydantic import Field

from raydapt.config import Section, TrainSection, load_job
from raydapt.recipes.dallmi_config import AADSection, AdaptSection, DALLMiTrainSection
from raydapt.recipes.ntk_select_config import LoRATrainSection
from raydapt.recipes.simda_config import AnnotateSection, DistillSection
from raydapt.train.settings import (
    AADLoss,
    FitTrain,
    LoRATrain,
    OptimFields,
    PULoss,
    StudentTrain,
    default,
    from_section,
)

# (section, settings, fields the recipe gives from elsewhere, section fields that are not
# this fit's settings)
PAIRS = [
    (TrainSection, OptimFields, set(), set()),
    (DistillSection, StudentTrain, {"min_confidence"}, {"student", "variants", "seed"}),
    (DALLMiTrainSection, FitTrain, set(), set()),
    (AdaptSection, FitTrain, set(), {f.name for f in fields(PULoss)} - {"mode"} | {"aad"}),
    (AdaptSection, PULoss, {"mode"}, {f.name for f in fields(FitTrain)} | {"aad"}),
    (AADSection, AADLoss, set(), set()),
    (LoRATrainSection, LoRATrain, set(), set()),
]


def drift(section: type[Section], settings: type, given: set[str],
          not_loop: set[str]) -> list[str]:
    """What differs between a section and the settings built from it: fields on one side
    only, defaults of another value or type."""
    sec = set(section.model_fields)
    mine = {f.name for f in fields(settings) if f.init}
    out = [f"{section.__name__}.{n}: not in {settings.__name__}"
           for n in sorted(sec - mine - not_loop)]
    out += [f"{settings.__name__}.{n}: not in {section.__name__} (and not given)"
            for n in sorted(mine - sec - given)]
    for n in sorted(sec & mine):
        a = section.model_fields[n].get_default(call_default_factory=True)
        b = default(settings, n)
        if a != b or type(a) is not type(b):  # 1 vs 1.0 would change a cache key's hash
            out.append(f"{n}: {section.__name__} default {a!r}, {settings.__name__} {b!r}")
    return out


@pytest.mark.parametrize("section,settings,given,not_loop", PAIRS,
                         ids=[f"{p[0].__name__}-{p[1].__name__}" for p in PAIRS])
def test_sections_and_fit_settings_have_one_set_of_fields_and_defaults(section, settings,
                                                                      given, not_loop):
    assert drift(section, settings, given, not_loop) == []
    # a default section gives the default settings (given fields at their defaults)
    built = from_section(settings, section(), **{n: default(settings, n) for n in given})
    assert built == settings()


def test_min_confidence_default_agrees_with_annotate():
    """StudentTrain.min_confidence is given by the recipe from annotate.min_confidence."""
    assert AnnotateSection.model_fields["min_confidence"].default == default(
        StudentTrain, "min_confidence")


def test_the_drift_check_sees_a_drifted_default_and_a_field_on_one_side():
    class Drifted(Section):
        epochs: int = Field(4, ge=1)  # OptimFields.epochs is 3
        lr: float = 5e-5
        momentum: float = 0.9  # no such setting

    out = drift(Drifted, OptimFields, set(), set())
    assert "epochs: Drifted default 4, OptimFields 3" in out
    assert "Drifted.momentum: not in OptimFields" in out
    assert "OptimFields.batch_size: not in Drifted (and not given)" in out

    class IntNotFloat(Section):
        lr: int = 1

    assert any("lr:" in x for x in drift(IntNotFloat, PULoss, set(), set()) +
               drift(IntNotFloat, OptimFields, set(), {"lr"}))


@pytest.mark.parametrize("job", ["jobs/simda/amazon-books-to-kitchen.cpu.yaml",
                                 "jobs/dallmi/pubmed-male-to-female.cpu.yaml",
                                 "jobs/ntk_select/medical-smollm.cpu.yaml"])
def test_from_section_copies_every_value_of_a_real_job(job):
    from pathlib import Path

    cfg = load_job(Path(__file__).resolve().parents[2] / job)
    sections = {"simda": [(cfg.distill if cfg.method == "simda" else None, StudentTrain)],
                "dallmi": [(getattr(cfg, "source", None), FitTrain),
                           (getattr(cfg, "adapt", None), FitTrain),
                           (getattr(cfg, "adapt", None), PULoss)],
                "ntk_select": [(getattr(cfg, "warmup", None), LoRATrain),
                               (getattr(cfg, "finetune", None), LoRATrain)]}[cfg.method]
    for sec, cls in sections:
        given = {"min_confidence": 0.25} if cls is StudentTrain else \
            {"mode": "log"} if cls is PULoss else {}
        built = asdict(from_section(cls, sec, **given))
        dump = sec.model_dump(mode="json")
        assert built == {n: given.get(n, dump.get(n)) for n in built}
