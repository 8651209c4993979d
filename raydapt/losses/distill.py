"""SimDA distillation losses: KL to the teacher distribution and similarity alignment.

Shapes: B rows in the batch, C classes, H_T / H_S teacher / student widths (they may differ).

- :func:`kl_distillation`: mean_i KL( p_T(·|x_i) ‖ softmax(z_S(x_i)/T) ) · T².
- :func:`similarity_alignment`: aligns within-batch similarity structure. With
  S_T[i,j] = cos(h_T(x_i), h_T(x_j)) and S_S likewise for the student, j ≠ i (representations
  centred on the batch mean first, by default):
  ``kind="kl"``: mean_i KL( softmax_j(S_T[i,·]/τ) ‖ softmax_j(S_S[i,·]/τ) );
  ``kind="mse"``: mean over i ≠ j of (S_T[i,j] − S_S[i,j])².
- :func:`pseudo_label_ce`: cross-entropy on argmax p_T (the CE ablation).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def kl_distillation(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, *, temperature: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, C] logits, [B, C] teacher probabilities (rows sum to 1) -> scalar.

    ``weights`` [B] (e.g. a confidence mask) weight each row's KL; the mean is over the weights.
    Terms with p_T = 0 contribute 0 (0·log 0 = 0).
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"logits {tuple(student_logits.shape)} vs teacher "
                         f"{tuple(teacher_probs.shape)}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = teacher_probs.float()
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), torch.zeros_like(p))
    per_row = kl.sum(-1)
    if weights is None:
        return per_row.mean() * temperature**2
    w = weights.float()
    return (per_row * w).sum() / w.sum().clamp_min(1e-12) * temperature**2


def _cosine_matrix(h: torch.Tensor) -> torch.Tensor:
    """[B, H] -> [B, B] cosine similarities."""
    z = F.normalize(h.float(), dim=-1, eps=1e-8)
    return z @ z.T


def similarity_alignment(
    teacher_h: torch.Tensor, student_h: torch.Tensor, *, tau: float = 0.1,
    kind: Literal["kl", "mse"] = "kl", center: bool = True,
) -> torch.Tensor:
    """[B, H_T], [B, H_S] -> scalar. Zero for B < 2 (no pair to align).

    ``center`` subtracts each side's batch mean before the cosines. LLM hidden states are highly
    anisotropic (measured: SmolLM2 last-token states have pairwise cosines 0.96-0.996), so
    uncentred teacher rows are near-uniform after the softmax and the loss then drives the
    student to collapse its representation (measured: a chance-level student). Centring removes
    the shared direction and keeps the relative structure.

    The teacher side is a target: gradients flow only into the student representation.
    """
    if teacher_h.shape[0] != student_h.shape[0]:
        raise ValueError("teacher and student batches differ in size")
    b = teacher_h.shape[0]
    if b < 2:
        return student_h.sum() * 0.0
    t, s = teacher_h.detach().float(), student_h.float()
    if center:
        t, s = t - t.mean(0, keepdim=True), s - s.mean(0, keepdim=True)
    s_t = _cosine_matrix(t)
    s_s = _cosine_matrix(s)
    off = ~torch.eye(b, dtype=torch.bool, device=student_h.device)
    if kind == "mse":
        return ((s_t - s_s)[off] ** 2).mean()
    # row-wise softmax over j != i: drop the diagonal, rows become [B, B-1]
    t_rows = (s_t[off].view(b, b - 1)) / tau
    s_rows = (s_s[off].view(b, b - 1)) / tau
    p_t = F.softmax(t_rows, dim=-1)
    return (p_t * (F.log_softmax(t_rows, dim=-1) - F.log_softmax(s_rows, dim=-1))).sum(-1).mean()


def pseudo_label_ce(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy on the teacher's argmax. [B, C], [B, C] -> scalar."""
    ce = F.cross_entropy(student_logits.float(), teacher_probs.argmax(-1), reduction="none")
    if weights is None:
        return ce.mean()
    w = weights.float()
    return (ce * w).sum() / w.sum().clamp_min(1e-12)
