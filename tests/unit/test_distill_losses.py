"""SimDA losses against naive loop references and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raydapt.losses.distill import kl_distillation, pseudo_label_ce, similarity_alignment


def naive_kl(logits, p, T):
    total = 0.0
    for i in range(logits.shape[0]):
        q = F.softmax(logits[i] / T, dim=-1)
        total += sum(float(p[i, c]) * math.log(float(p[i, c]) / float(q[c]))
                     for c in range(logits.shape[1]) if p[i, c] > 0)
    return total / logits.shape[0] * T * T


def naive_sim(ht, hs, tau, kind, center):
    b = ht.shape[0]
    if center:
        ht = ht - sum(ht[i] for i in range(b)) / b
        hs = hs - sum(hs[i] for i in range(b)) / b
    cos = lambda a, c: float(a @ c / (a.norm() * c.norm()))  # noqa: E731
    if kind == "mse":
        vals = [(cos(ht[i], ht[j]) - cos(hs[i], hs[j])) ** 2
                for i in range(b) for j in range(b) if i != j]
        return sum(vals) / len(vals)
    tot = 0.0
    for i in range(b):
        st = [cos(ht[i], ht[j]) / tau for j in range(b) if j != i]
        ss = [cos(hs[i], hs[j]) / tau for j in range(b) if j != i]
        zt = sum(math.exp(x) for x in st)
        zs = sum(math.exp(x) for x in ss)
        pt = [math.exp(x) / zt for x in st]
        ps = [math.exp(x) / zs for x in ss]
        tot += sum(a * math.log(a / c) for a, c in zip(pt, ps))
    return tot / b


def test_kl_hand_value():
    # logits equal -> q = (0.5, 0.5); p = (1, 0): KL = 1*log(1/0.5) = log 2
    z = torch.zeros(1, 2)
    p = torch.tensor([[1.0, 0.0]])
    assert float(kl_distillation(z, p)) == pytest.approx(math.log(2), abs=1e-6)
    # T = 2 scales by T^2 = 4 (q is still uniform)
    assert float(kl_distillation(z, p, temperature=2.0)) == pytest.approx(4 * math.log(2), abs=1e-6)
    # teacher equals the student -> 0
    z2 = torch.tensor([[1.0, -1.0]])
    assert float(kl_distillation(z2, F.softmax(z2, -1))) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_kl_matches_naive(T):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 3, generator=g)
    p = F.softmax(torch.randn(7, 3, generator=g), -1)
    p[0] = torch.tensor([1.0, 0.0, 0.0])  # a zero entry: 0 log 0 = 0
    assert float(kl_distillation(z, p, temperature=T)) == pytest.approx(naive_kl(z, p, T), rel=1e-5)


def test_kl_weights_select_rows():
    z = torch.tensor([[0.0, 0.0], [3.0, -3.0]])
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    only_first = kl_distillation(z, p, weights=torch.tensor([1.0, 0.0]))
    assert float(only_first) == pytest.approx(math.log(2), abs=1e-6)


def test_kl_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="logits"):
        kl_distillation(torch.zeros(2, 3), torch.full((2, 2), 0.5))


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_similarity_matches_naive(kind, center):
    g = torch.Generator().manual_seed(1)
    ht, hs = torch.randn(5, 8, generator=g), torch.randn(5, 3, generator=g)
    got = float(similarity_alignment(ht, hs, tau=0.5, kind=kind, center=center))
    assert got == pytest.approx(naive_sim(ht, hs, 0.5, kind, center), rel=1e-5)


def test_centering_removes_a_shared_direction():
    # anisotropic teacher: a big common offset makes every uncentred cosine ~1
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 4, generator=g)
    ht = base + 100.0
    assert float(similarity_alignment(ht, base, kind="mse", center=True)) == pytest.approx(
        0.0, abs=1e-6)
    assert float(similarity_alignment(ht, base, kind="mse", center=False)) > 0.1


def test_similarity_hand_value_mse():
    # teacher: rows 0,1 identical, row 2 orthogonal -> S_T offdiag = [[1,0],[1,0],[0,0]]
    ht = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # student: all three identical -> S_S offdiag all 1
    hs = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    # pairs (i!=j): (0,1):0, (0,2):1, (1,0):0, (1,2):1, (2,0):1, (2,1):1 -> mean 4/6
    assert float(similarity_alignment(ht, hs, kind="mse", center=False)) == pytest.approx(
        4 / 6, abs=1e-6)


def test_similarity_zero_when_structures_agree_and_grad_only_to_student():
    g = torch.Generator().manual_seed(2)
    ht = torch.randn(4, 6, generator=g, requires_grad=True)
    hs = (ht.detach() * 3.0).clone().requires_grad_(True)  # same cosines, other scale
    loss = similarity_alignment(ht, hs, tau=0.1)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    hs2 = torch.randn(4, 6, generator=g, requires_grad=True)
    similarity_alignment(ht, hs2).backward()
    assert ht.grad is None and hs2.grad is not None and hs2.grad.abs().sum() > 0


def test_similarity_batch_of_one_is_zero():
    assert float(similarity_alignment(torch.randn(1, 4), torch.randn(1, 2))) == 0.0


def test_pseudo_label_ce_hand_value():
    z = torch.zeros(2, 2)
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert float(pseudo_label_ce(z, p)) == pytest.approx(math.log(2), abs=1e-6)
    z = torch.tensor([[2.0, 0.0]])
    want = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(pseudo_label_ce(z, torch.tensor([[0.6, 0.4]]))) == pytest.approx(want, abs=1e-6)
