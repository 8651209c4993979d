"""DALLMi job config: the multi-label data, label hiding, encoder, source fit and adaptation. (Recipe: :mod:`raydapt.recipes.dallmi`.)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raydapt.config import (
    DataInput,
    JobBase,
    ModelInput,
    Section,
    TrainSection,
    data_root,
)
from raydapt.train.settings import AADLoss, FitTrain, PULoss

PUBMED_LABELS = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "L", "M", "N", "Z"]


class DALLMiData(Section):
    """One multi-label file; source and target domains are selected by a field's values."""

    root: str = Field("${RAYDAPT_DATA:-../shared/data}/pubmed_mesh",
                      description="Directory the path is relative to.")
    path: str = Field("pubmed.jsonl", description="jsonl / parquet / csv file.")
    format: Literal["auto", "jsonl", "parquet", "csv"] = "auto"
    id_field: str = "id"
    text_field: str = "text"
    labels_field: str | None = Field(
        "labels", description="Column holding a list of label names per row (None: use "
        "label_columns).")
    label_columns: list[str] | None = Field(
        None, description="One-hot label columns (0/1), used instead of labels_field; their "
        "names are the label names.")
    labels: list[str] | None = Field(
        default_factory=lambda: list(PUBMED_LABELS),
        description="Label vocabulary in head order; None = every label seen in the file "
        "(sorted). A row with a label outside it is a reject.")
    domain_field: str = Field("domain", description="Column that names each row's domain.")
    source_domains: list[str] = Field(default_factory=lambda: ["male"], min_length=1)
    target_domains: list[str] = Field(default_factory=lambda: ["female"], min_length=1)
    test_fraction: float = Field(0.2, gt=0, lt=1,
                                 description="Seeded id-hash split per domain (paper: 80/20).")
    max_source_rows: int | None = Field(None, ge=1, description="Cap on source train rows.")
    max_target_train_rows: int | None = Field(None, ge=1)
    max_target_test_rows: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DALLMiData:
        if self.labels_field is None and not self.label_columns:
            raise ValueError("set data.labels_field or data.label_columns")
        if set(self.source_domains) & set(self.target_domains):
            raise ValueError(f"source_domains {self.source_domains} and target_domains "
                             f"{self.target_domains} overlap")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        return self


class HideSection(Section):
    """Seeded hiding of target-train positives (the test split keeps every label)."""

    keep_ratio: float = Field(0.5, ge=0, le=1, description="Share r of positives kept "
                              "(paper: 0.5 / 0.3 / 0.1, i.e. 50/70/90 % hidden).")
    strategy: Literal["per_label", "per_sample"] = "per_label"


class EncoderSection(Section):
    """The multi-label classifier: encoder + linear sigmoid head."""

    encoder: str = Field("pkg:all-minilm-l6-v2", description="pkg:<alias>, hf:<repo id>, path.")
    pooling: Literal["cls", "mean"] = Field("mean", description="Pooled representation.")
    dropout: float = Field(0.1, ge=0, lt=1)
    train_layers: int | None = Field(
        None, ge=0, description="Train only the top N encoder layers (+ head); None = all. "
        "A CPU-scale knob: the forward pass is unchanged, the backward pass gets cheaper.")
    trust_remote_code: bool = False


class DALLMiTrainSection(TrainSection):
    """A fit of the classifier (source fine-tune or target adaptation)."""

    in_process: bool = Field(
        FitTrain.in_process, description="Run the training loop in this process instead of a "
        "TorchTrainer (needs num_workers: 1; no Ray Train start-up, for grids and Tune trials).")
    log_every: int = Field(FitTrain.log_every, ge=0,
                           description="Steps between progress lines (0 = 4 per epoch).")

    @model_validator(mode="after")
    def _in_process_single(self) -> DALLMiTrainSection:
        if self.in_process and self.num_workers != 1:
            raise ValueError(f"in_process: true needs num_workers: 1 (got {self.num_workers})")
        return self


class AADSection(Section):
    """Adversarial adaptation with distillation (Ryu & Lee 2020; bzantium/bert-AAD defaults)."""

    gen_weight: float = Field(AADLoss.gen_weight, ge=0,
                              description="alpha: weight of the encoder's GAN loss.")
    kd_weight: float = Field(AADLoss.kd_weight, ge=0,
                             description="beta: weight of the distillation loss.")
    temperature: float = Field(AADLoss.temperature, gt=0,
                               description="KD temperature T (loss scaled by T^2).")
    disc_lr: float = Field(AADLoss.disc_lr, gt=0, description="Discriminator learning rate.")
    disc_hidden: int = Field(AADLoss.disc_hidden, ge=1, description="Discriminator hidden width.")


class AdaptSection(DALLMiTrainSection):
    """Target adaptation: the DALLMi loss (and the baselines' fits) from the source checkpoint."""

    alpha: float = Field(PULoss.alpha, gt=0, description="MixUp mu ~ Beta(alpha, beta).")
    beta: float = Field(PULoss.beta, gt=0)
    lam: float = Field(PULoss.lam, ge=0, description="Weight of the MixUp regulariser.")
    mixup_level: Literal["embedding", "encoder", "pooled"] = (
        PULoss.mixup_level)  # type: ignore[assignment]
    mixup_grad: bool = Field(PULoss.mixup_grad, description="False reproduces the reference "
                             "code's detached regulariser.")
    positive_reduction: Literal["norm", "mean"] = Field(
        PULoss.positive_reduction,  # type: ignore[arg-type]
        description="Positive term of the norm loss: L2 norm (paper) or mean.")
    random_share: float = Field(PULoss.random_share, ge=0, le=1, description="Share of each "
                                "cycle-sampler batch drawn uniformly (rows without observed "
                                "positives).")
    detach_target: bool = PULoss.detach_target
    aad: AADSection = Field(default_factory=AADSection)


DALLMiMethod = Literal["no_adapt", "bce_partial", "bce_oracle", "aad", "dallmi", "dallmi_log"]


class DALLMiJob(JobBase):
    """DALLMi: source fine-tune (BCE), then positive-unlabeled adaptation to the target."""

    method: Literal["dallmi"] = "dallmi"
    data: DALLMiData = Field(default_factory=DALLMiData)
    hide: HideSection = Field(default_factory=HideSection)
    model: EncoderSection = Field(default_factory=EncoderSection)
    source: DALLMiTrainSection = Field(default_factory=DALLMiTrainSection)
    adapt: AdaptSection = Field(default_factory=AdaptSection)
    methods: list[DALLMiMethod] = Field(
        default_factory=lambda: ["no_adapt", "bce_partial", "bce_oracle", "aad", "dallmi",
                                 "dallmi_log"],
        min_length=1, description="What to evaluate on the target test split.")
    threshold: float = Field(0.5, gt=0, lt=1, description="Probability threshold for F1 and "
                             "the binarised mAP.")

    def inputs(self) -> tuple[list[ModelInput], list[DataInput]]:
        return ([ModelInput("model.encoder", self.model.encoder)],
                [DataInput("data.path", data_root(self.data.root) / self.data.path,
                           self.data.format)])
