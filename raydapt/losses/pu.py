"""DALLMi positive-unlabeled losses: variational PU loss and the MixUp regulariser (plain PyTorch).

Notation (methods.md section 2). A batch has B rows and L labels; ``probs`` Φ [B, L] are the
sigmoid outputs of the classifier and ``observed`` [B, L] in {0, 1} marks the *observed*
positives. For label l, P_l = rows with ``observed[:, l] == 1`` and U_l = all other rows (hidden
positives and true negatives look the same).

- :func:`variational_pu_loss` — L_var^l, norm-based (the paper's Eq. 1 / reference code) or
  log-based (original VPU), vectorised over labels with masks.
- :func:`mixup_pairs`, :func:`sample_mu`, :func:`mixed_label_probs`, :func:`mixup_regularizer` —
  M_reg^l: one (positive, unlabeled) pair per label, μ ~ Beta(α, β), interpolation at the
  word-embedding, encoder-output or pooled level, all pairs in ONE batched forward pass.
- :func:`dallmi_loss` — the total L = Σ_l (L_var^l + λ·M_reg^l) from one call.

Edge cases (defined, not errors):

- A label with no observed positive in the batch (empty P_l) contributes exactly 0 to L_var and
  has no MixUp pair (it has nothing to learn from in this batch).
- A label whose rows are all observed positives (empty U_l): the unlabeled term of the norm loss
  is 0, and the label has no MixUp pair. (The log loss's first term runs over U_l ∪ P_l, i.e. all
  rows, so it is always defined.)

Nothing here imports Ray.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # type hints only: keeps this module free of the training package's imports
    from raydapt.train.models import EncoderClassifier

PositiveReduction = Literal["norm", "mean"]
VariationalMode = Literal["norm", "log"]
MixupLevel = Literal["embedding", "encoder", "pooled"]

__all__ = [
    "DallmiLoss",
    "dallmi_loss",
    "mixed_label_probs",
    "mixup_pairs",
    "mixup_regularizer",
    "sample_mu",
    "variational_pu_loss",
]


def _check_probs_observed(probs: torch.Tensor, observed: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must be [B, L], got shape {tuple(probs.shape)}")
    if observed.shape != probs.shape:
        raise ValueError(
            f"observed {tuple(observed.shape)} must have the shape of probs {tuple(probs.shape)}"
        )


def variational_pu_loss(
    probs: torch.Tensor,
    observed: torch.Tensor,
    *,
    positive_reduction: PositiveReduction = "norm",
    mode: VariationalMode = "norm",
    eps: float = 1e-6,
    log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variational PU loss summed over labels.

    Args:
        probs: Φ [B, L], sigmoid outputs in [0, 1].
        observed: [B, L] in {0, 1} (bool / int / float): observed positives.
        positive_reduction: ``norm`` mode only. ``norm``: subtract ‖Φ_l(P_l)‖₂, the L2 norm of
            the vector of positive probabilities (paper Eq. 1, reference code); ``mean``:
            subtract mean_{p∈P_l} Φ_l(p). Ignored in ``log`` mode.
        mode: ``norm``: L_var^l = mean_{u∈U_l} Φ_l(u) − reduce(Φ_l(P_l)).
            ``log`` (original VPU): L_var^l = log mean_{x∈U_l∪P_l} Φ_l(x)
            − mean_{p∈P_l} log Φ_l(p).
        eps: ``log`` mode without ``log_probs``: probabilities are clamped to ≥ eps before the
            logs (a prob below eps then gets no gradient through that log).
        log_probs: optional [B, L] log Φ (e.g. ``F.logsigmoid(logits)``); in ``log`` mode it is
            used instead of ``log(probs.clamp_min(eps))`` — exact and stable for tiny Φ.

    Returns:
        ``(loss, per_label)``: loss is a scalar, the sum over labels of per_label [L]. Labels with
        empty P_l are 0 in per_label; empty U_l makes the norm-mode unlabeled term 0.
    """
    _check_probs_observed(probs, observed)
    if mode not in ("norm", "log"):
        raise ValueError(f"mode must be 'norm' or 'log', got {mode!r}")
    if positive_reduction not in ("norm", "mean"):
        raise ValueError(f"positive_reduction must be 'norm' or 'mean', got {positive_reduction!r}")
    pos = observed.to(device=probs.device, dtype=torch.bool)
    posf = pos.to(probs.dtype)  # [B, L]
    n_pos = posf.sum(0)  # [L]
    has_pos = n_pos > 0  # [L]
    zeros = torch.zeros_like(n_pos)
    if probs.shape[0] == 0:
        per_label = zeros
        return per_label.sum(), per_label

    if mode == "norm":
        unlf = 1.0 - posf
        n_unl = unlf.sum(0)
        unl_term = (probs * unlf).sum(0) / n_unl.clamp_min(1.0)  # 0 when U_l is empty
        if positive_reduction == "norm":
            # vector_norm's backward is 0 (not NaN) for an all-zero column (empty P_l).
            pos_term = torch.linalg.vector_norm(probs * posf, ord=2, dim=0)
        else:
            pos_term = (probs * posf).sum(0) / n_pos.clamp_min(1.0)
        per_label = unl_term - pos_term
    else:
        if log_probs is None:
            lp = torch.log(probs.clamp_min(eps))
            all_term = torch.log(probs.mean(0).clamp_min(eps))
        else:
            if log_probs.shape != probs.shape:
                raise ValueError("log_probs must have the shape of probs")
            lp = log_probs
            all_term = torch.logsumexp(lp, dim=0) - math.log(probs.shape[0])
        pos_term = (lp * posf).sum(0) / n_pos.clamp_min(1.0)
        per_label = all_term - pos_term

    per_label = torch.where(has_pos, per_label, zeros)
    return per_label.sum(), per_label


def mixup_pairs(
    observed: torch.Tensor, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random (positive, unlabeled) row pair per label that has both in the batch.

    Args:
        observed: [B, L] in {0, 1}.
        generator: a seeded ``torch.Generator`` (CPU or on observed's device); draws are
            uniform among the label's P_l rows and, independently, its U_l rows.

    Returns:
        ``(label_idx, pos_idx, unl_idx)``, each int64 [L'] on observed's device, L' = number of
        labels with |P_l| ≥ 1 and |U_l| ≥ 1, in increasing label order.
    """
    if observed.dim() != 2:
        raise ValueError(f"observed must be [B, L], got shape {tuple(observed.shape)}")
    pos = observed.to(torch.bool)
    unl = ~pos
    shape = tuple(pos.shape)
    r_pos = torch.rand(shape, generator=generator, device=generator.device).to(pos.device)
    r_unl = torch.rand(shape, generator=generator, device=generator.device).to(pos.device)
    # rand is in [0, 1): masked-out rows get -1, so argmax picks a uniformly random member.
    pos_pick = torch.where(pos, r_pos, torch.full_like(r_pos, -1.0)).argmax(0)  # [L]
    unl_pick = torch.where(unl, r_unl, torch.full_like(r_unl, -1.0)).argmax(0)  # [L]
    label_idx = torch.nonzero(pos.any(0) & unl.any(0), as_tuple=False).flatten()
    return label_idx, pos_pick[label_idx], unl_pick[label_idx]


def sample_mu(
    n: int, *, alpha: float, beta: float, generator: torch.Generator
) -> torch.Tensor:
    """n draws of μ ~ Beta(α, β) as float32 [n] on CPU, reproducible from ``generator``.

    ``torch.distributions.Beta`` takes no generator, so a seed is drawn from ``generator`` and
    the Beta draw runs under a forked global RNG (the global RNG state is left untouched).
    """
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"Beta shapes must be > 0, got alpha={alpha}, beta={beta}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dist = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(beta)))
        return dist.sample((n,))


def _rows_forward(
    model: EncoderClassifier,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    *,
    pooled_out: bool,
) -> torch.Tensor:
    """Recompute last hidden states [R, T, D] (or pooled [R, D]) for ``rows`` [R] in one pass.

    Duplicate rows are computed once (``torch.unique``) and scattered back.
    """
    uniq, inverse = torch.unique(rows, return_inverse=True)
    mask = attention_mask[uniq]
    hidden = model.encode(model.embed(input_ids[uniq]), mask)
    out = model.pool(hidden, mask) if pooled_out else hidden
    return out[inverse]


def mixed_label_probs(
    model: EncoderClassifier,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    label_idx: torch.Tensor,
    pos_idx: torch.Tensor,
    unl_idx: torch.Tensor,
    mu: torch.Tensor,
    *,
    level: MixupLevel = "embedding",
    hidden: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Φ_l(x̃) for each pair, x̃ = μ·x_p + (1−μ)·x_u, all L' pairs in ONE batched pass.

    Args:
        model: an :class:`EncoderClassifier` (its embed / encode / pool / head steps are used).
        input_ids, attention_mask: the batch, [B, T] each.
        label_idx, pos_idx, unl_idx: int64 [L'] (see :func:`mixup_pairs`).
        mu: [L'] mixing weights; μ weights the POSITIVE row.
        level: where to interpolate.
            ``embedding``: word-embedding outputs of the two rows (recomputed from input_ids
            with ``model.embed``, a lookup), mask = union of the two masks, then
            encode → pool → head (exactly one encoder call with L' rows).
            ``encoder``: last hidden states, then pool (union mask) → head.
            ``pooled``: pooled vectors, then head.
        hidden: optional [B, T, D] last hidden states of the batch (``encoder`` level); when
            absent they are recomputed for the needed rows in one encoder call.
        pooled: optional [B, D] pooled vectors of the batch (``pooled`` level); recomputed
            likewise when absent. Passing the main forward's tensors avoids a second pass and
            keeps the gradient path through them.

    Returns:
        [L'] sigmoid probabilities of the mixed inputs at their own label.
    """
    n = int(label_idx.numel())
    if n == 0:
        return torch.zeros(0, device=input_ids.device)
    both = torch.cat([pos_idx, unl_idx])  # [2L']
    if level == "embedding":
        emb = model.embed(input_ids[both])  # [2L', T, D]
        m = mu.to(device=emb.device, dtype=emb.dtype).view(n, 1, 1)
        mixed = m * emb[:n] + (1.0 - m) * emb[n:]
        mask = torch.maximum(attention_mask[pos_idx], attention_mask[unl_idx])
        z = model.pool(model.encode(mixed, mask), mask)
    elif level == "encoder":
        h = hidden[both] if hidden is not None else _rows_forward(
            model, input_ids, attention_mask, both, pooled_out=False
        )
        m = mu.to(device=h.device, dtype=h.dtype).view(n, 1, 1)
        mixed = m * h[:n] + (1.0 - m) * h[n:]
        mask = torch.maximum(attention_mask[pos_idx], attention_mask[unl_idx])
        z = model.pool(mixed, mask)
    elif level == "pooled":
        zz = pooled[both] if pooled is not None else _rows_forward(
            model, input_ids, attention_mask, both, pooled_out=True
        )
        m = mu.to(device=zz.device, dtype=zz.dtype).view(n, 1)
        z = m * zz[:n] + (1.0 - m) * zz[n:]
    else:
        raise ValueError(f"level must be 'embedding', 'encoder' or 'pooled', got {level!r}")
    logits = model.head(z)  # [L', C]
    return torch.sigmoid(logits[torch.arange(n, device=logits.device), label_idx.to(logits.device)])


def mixup_regularizer(
    model: EncoderClassifier,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    probs: torch.Tensor,
    observed: torch.Tensor,
    *,
    level: MixupLevel = "embedding",
    alpha: float,
    beta: float,
    generator: torch.Generator,
    grad: bool = True,
    detach_target: bool = False,
    mu: torch.Tensor | None = None,
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    hidden: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DALLMi MixUp regulariser, M_reg^l = (Φ̃_l − Φ_l(x̃_l))², summed over labels.

    Per label with ≥1 observed positive and ≥1 unlabeled row in the batch: a random pair
    (p, u) (:func:`mixup_pairs`), μ ~ Beta(α, β) (:func:`sample_mu`), mixed input
    x̃ = μ·x_p + (1−μ)·x_u at ``level`` and target Φ̃ = μ·1 + (1−μ)·Φ_l(u), Φ_l(u) read from
    ``probs`` (the batch's main forward). μ weights the positive side in both input and target
    (VPU's consistent pairing). The spec's (‖Φ̃‖ − ‖Φ_l(x̃)‖)² equals this for scalars in [0, 1].

    Args:
        model: :class:`EncoderClassifier`; its train/eval mode is left as is.
        input_ids, attention_mask: [B, T] each.
        probs: Φ [B, L] of the main forward (target side).
        observed: [B, L] in {0, 1}.
        level: ``embedding`` | ``encoder`` | ``pooled`` (see :func:`mixed_label_probs`).
        alpha, beta: Beta shape parameters for μ.
        generator: seeded ``torch.Generator`` for pairs and μ.
        grad: ``False`` reproduces the reference code's bug: the regulariser is computed
            under ``no_grad`` and carries no gradient into the model.
        detach_target: stop the gradient through Φ_l(u) in the target (VPU keeps it; default).
        mu: inject μ [L'] instead of sampling (tests, ablations).
        pairs: inject ``(label_idx, pos_idx, unl_idx)`` instead of drawing them.
        hidden, pooled: the main forward's [B, T, D] / [B, D] tensors for the ``encoder`` /
            ``pooled`` levels (otherwise recomputed in one encoder call).

    Returns:
        ``(reg, per_label)``: scalar sum and [L] per-label values (0 for labels without a pair).
    """
    _check_probs_observed(probs, observed)
    label_idx, pos_idx, unl_idx = pairs if pairs is not None else mixup_pairs(
        observed, generator=generator
    )
    n_labels = probs.shape[1]
    n = int(label_idx.numel())
    if mu is None:
        mu = sample_mu(n, alpha=alpha, beta=beta, generator=generator)
    elif mu.shape != (n,):
        raise ValueError(f"mu must have shape ({n},), got {tuple(mu.shape)}")
    per_label = probs.new_zeros(n_labels)
    if n == 0:
        return per_label.sum().detach(), per_label.detach()
    with nullcontext() if grad else torch.no_grad():
        phi_mix = mixed_label_probs(
            model, input_ids, attention_mask, label_idx, pos_idx, unl_idx, mu,
            level=level, hidden=hidden, pooled=pooled,
        )
        mu_t = mu.to(device=probs.device, dtype=probs.dtype)
        phi_u = probs[unl_idx, label_idx]
        if detach_target or not grad:
            phi_u = phi_u.detach()
        target = mu_t + (1.0 - mu_t) * phi_u
        per_pair = (target - phi_mix.to(probs.dtype)) ** 2  # [L']
        per_label = per_label.index_put((label_idx.to(probs.device),), per_pair)
    if not grad:
        per_label = per_label.detach()
    return per_label.sum(), per_label


@dataclass
class DallmiLoss:
    """Output of :func:`dallmi_loss`. Scalars are 0-dim tensors; per-label tensors are [L]."""

    loss: torch.Tensor
    variational: torch.Tensor
    regularizer: torch.Tensor
    per_label_variational: torch.Tensor
    per_label_regularizer: torch.Tensor
    logits: torch.Tensor  # [B, L]
    pooled: torch.Tensor  # [B, D]


def dallmi_loss(
    model: EncoderClassifier,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    observed: torch.Tensor,
    *,
    generator: torch.Generator,
    lam: float = 1.0,
    alpha: float = 0.3,
    beta: float = 0.3,
    level: MixupLevel = "embedding",
    positive_reduction: PositiveReduction = "norm",
    mode: VariationalMode = "norm",
    mixup_grad: bool = True,
    detach_target: bool = False,
    eps: float = 1e-6,
) -> DallmiLoss:
    """L = Σ_l (L_var^l + λ·M_reg^l) for one batch: main forward, then the batched MixUp pass.

    Defaults are the paper's (λ=1, α=β=0.3, norm loss, embedding-level MixUp). The main
    forward runs step by step so the ``encoder`` / ``pooled`` levels reuse its hidden states
    and pooled vectors (one encoder call in total for those levels, two for ``embedding``).

    Args:
        model: :class:`EncoderClassifier` with L outputs.
        input_ids, attention_mask: [B, T] each.
        observed: [B, L] in {0, 1}.
        generator: seeded ``torch.Generator`` for the MixUp pairs and μ.
        lam: λ, weight of the regulariser.
        alpha, beta, level, mixup_grad (→ ``grad``), detach_target: see
            :func:`mixup_regularizer`.
        positive_reduction, mode, eps: see :func:`variational_pu_loss` (log mode uses
            ``logsigmoid(logits)`` for exact logs).
    """
    hidden = model.encode(model.embed(input_ids), attention_mask)  # [B, T, D]
    pooled = model.pool(hidden, attention_mask)  # [B, D]
    logits = model.head(pooled)  # [B, L]
    probs = torch.sigmoid(logits)
    log_probs = torch.nn.functional.logsigmoid(logits) if mode == "log" else None
    var, var_per = variational_pu_loss(
        probs, observed, positive_reduction=positive_reduction, mode=mode, eps=eps,
        log_probs=log_probs,
    )
    reg, reg_per = mixup_regularizer(
        model, input_ids, attention_mask, probs, observed, level=level, alpha=alpha, beta=beta,
        generator=generator, grad=mixup_grad, detach_target=detach_target,
        hidden=hidden, pooled=pooled,
    )
    return DallmiLoss(
        loss=var + lam * reg, variational=var, regularizer=reg,
        per_label_variational=var_per, per_label_regularizer=reg_per,
        logits=logits, pooled=pooled,
    )
