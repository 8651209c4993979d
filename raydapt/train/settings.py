"""Every training setting, defined once: the typed settings of the three fits (plain frozen
dataclasses, no torch import) and :func:`from_section`, the one way a job's train section
becomes them.

The job sections (:class:`raydapt.config.TrainSection`, ``DistillSection``,
``DALLMiTrainSection`` / ``AdaptSection``, ``LoRATrainSection``) take their defaults from the
class attributes here (``Field(StudentTrain.beta, ...)``), so there is one set of defaults;
``tests/unit/test_train_settings.py`` fails if a field or a default drifts between a section and
the settings its fit receives.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from raydapt.train import Steps, per_worker_batch, plan_steps
from raydapt.train.launch import Workers

T = TypeVar("T")


@dataclass(frozen=True)
class ScalingFields:
    """The scaling half of a fit's settings (the base of StudentTrain, FitTrain, LoRATrain):
    the fields a job's train section names, and the :class:`~raydapt.train.launch.Workers`
    they make. A subclass sets ``keep_checkpoints`` and ``max_failures`` (class level) or has
    them as fields."""

    num_workers: int = 2
    cpus_per_worker: float = 1  # an int: a default job dumps (and hashes) it as 1, as before
    use_gpu: bool = False
    resources: dict[str, float] = field(default_factory=dict)
    keep_checkpoints: ClassVar[int | None] = 1
    max_failures: ClassVar[int] = 0

    @property
    def workers(self) -> Workers:
        return Workers(self.num_workers, float(self.cpus_per_worker), self.use_gpu,
                       dict(self.resources), self.max_failures, self.keep_checkpoints)


@dataclass(frozen=True)
class OptimFields(ScalingFields):
    """The optimisation fields every encoder fit shares (:class:`raydapt.config.TrainSection`):
    the base of StudentTrain and FitTrain."""

    max_failures: int = 1  # type: ignore[misc]  # a field here: Ray Train retries
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128


@dataclass(frozen=True)
class StudentTrain(OptimFields):
    """How one SimDA student trains: the DistillSection's optimisation, scaling and loss fields
    (and ``min_confidence``, from annotate.min_confidence).

    ``steps`` (if set) is the number of optimiser steps whatever the row count (step-matched
    baselines); otherwise ``epochs`` passes over the rows. The loss knobs only matter to the
    distilled objectives (``min_confidence`` drops pseudo-labels below it)."""

    steps: int | None = None
    beta: float = 1.0
    temperature: float = 1.0
    sim_tau: float = 1.0
    sim_loss: str = "kl"
    sim_center: bool = True
    min_confidence: float = 0.0
    eval_every_epoch: bool = True
    text_truncation: str = "head"

    def steps_for(self, rows: int, *, workers: int | None = None,
                  name: str = "student") -> Steps:
        """The :class:`~raydapt.train.Steps` of a student on ``rows`` training rows (the one
        rule, :func:`~raydapt.train.plan_steps`): ``steps`` in all if set, else ``epochs``
        epochs; per worker ``batch_size // workers`` rows, equal slices, last partial batch
        dropped."""
        w = self.num_workers if workers is None else workers
        return plan_steps(rows, workers=w, per_worker_batch=per_worker_batch(self.batch_size, w),
                          epochs=self.epochs, steps=self.steps, name=name)


@dataclass(frozen=True)
class FitTrain(OptimFields):
    """How one DALLMi fit trains: a DALLMi train section's scaling and optimisation fields.
    ``in_process`` runs the loop in this process (one worker, no Ray Train)."""

    in_process: bool = False
    log_every: int = 0

    def steps_for(self, rows: int, *, workers: int | None = None, name: str = "fit") -> Steps:
        """The :class:`~raydapt.train.Steps` of a DALLMi fit on ``rows`` training rows (the one
        rule, rounding up: :func:`~raydapt.train.plan_steps` with ``drop_last=False``).

        DALLMi's count, kept so that no result changes: an epoch is ``ceil(rows /
        batch_size)`` batches of the GLOBAL batch size dealt out to the workers, while each
        worker draws ``batch_size // workers`` rows per step. In the rule's terms the global
        batch is passed as the per-worker batch; at ``workers > 1`` an epoch covers about
        ``rows / workers`` rows (at one worker, every row once)."""
        w = 1 if self.in_process else self.num_workers if workers is None else workers
        return plan_steps(rows, workers=w, per_worker_batch=self.batch_size, epochs=self.epochs,
                          name=name, drop_last=False)


@dataclass(frozen=True)
class PULoss:
    """The DALLMi objective's knobs (see :func:`raydapt.losses.pu.dallmi_loss`) and the
    class-cycle sampler's random share (AdaptSection's fields; ``mode`` comes from the method:
    dallmi = norm, dallmi_log = log)."""

    alpha: float = 0.3
    beta: float = 0.3
    lam: float = 1.0
    mixup_level: str = "embedding"
    mixup_grad: bool = True
    positive_reduction: str = "norm"
    detach_target: bool = False
    mode: str = "norm"
    random_share: float = 0.25


@dataclass(frozen=True)
class AADLoss:
    """AAD's knobs (AADSection): GAN and distillation weights, KD temperature, discriminator."""

    gen_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 20.0
    disc_lr: float = 1e-5
    disc_hidden: int = 3072


@dataclass(frozen=True)
class LoRATrain(ScalingFields):
    """How a LoRA adapter trains: the LoRATrainSection's scaling, optimisation and DeepSpeed
    fields (``batch_size`` is global: micro batch x ``grad_accum`` x workers). Not retried
    (``max_failures`` 0) and every checkpoint is kept."""

    keep_checkpoints: ClassVar[int | None] = None
    threads: int | None = None
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    zero_stage: int = 2
    dtype: str = "float32"
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False

    def steps_for(self, rows: int, *, workers: int | None = None, name: str = "lora") -> Steps:
        """The :class:`~raydapt.train.Steps` of a LoRA fit on ``rows`` rows, in micro steps (the
        one rule, :func:`~raydapt.train.plan_steps`): per worker ``batch_size // (workers *
        grad_accum)`` rows per micro step, ``rows // workers`` rows per epoch, last partial
        batch dropped. The optimiser steps :meth:`optimiser_steps` times."""
        w = self.num_workers if workers is None else workers
        return plan_steps(rows, workers=w, per_worker_batch=per_worker_batch(
            self.batch_size, w, self.grad_accum), epochs=self.epochs, name=name)

    def optimiser_steps(self, steps: Steps) -> int:
        """Optimiser steps of a fit of ``steps`` micro steps (at least 1)."""
        return max(1, steps.total // self.grad_accum)


def default(cls: type, name: str) -> Any:
    """The default of settings field ``name`` of ``cls`` (a ``default_factory`` is called)."""
    f = {f.name: f for f in fields(cls)}[name]
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def from_section(cls: type[T], section: Any, **given: Any) -> T:
    """``cls`` (a settings dataclass) from a job section: every field of ``cls`` is the
    section's value of the same name (``model_dump(mode="json")``: plain values), except the
    ones in ``given`` (values the recipe takes from elsewhere, e.g. ``min_confidence`` from
    annotate). The section's other fields are not training settings of this fit.

    Raises:
        TypeError: a field of ``cls`` is neither in the section nor given, or ``given`` names
            a field ``cls`` does not have (a renamed field fails here, not in a worker).
    """
    names = [f.name for f in fields(cls) if f.init]
    data = section.model_dump(mode="json")
    unknown = sorted(set(given) - set(names))
    missing = [n for n in names if n not in given and n not in data]
    if unknown or missing:
        raise TypeError(f"{cls.__name__} from {type(section).__name__}: "
                        + (f"not a field: {unknown}; " if unknown else "")
                        + (f"neither in the section nor given: {missing}" if missing else ""))
    return cls(**{n: given[n] if n in given else data[n] for n in names})
