"""DALLMi PU losses: variational loss, MixUp pairs / μ / regulariser, total loss."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raydapt.losses.pu import (
    dallmi_loss,
    mixed_label_probs,
    mixup_pairs,
    mixup_regularizer,
    sample_mu,
    variational_pu_loss,
)
from raydapt.train.models import EncoderClassifier, tiny_bert

N_LABELS = 4
LEVELS = ["embedding", "encoder", "pooled"]


# --------------------------------------------------------------------------- naive references


def naive_variational(probs, observed, *, positive_reduction="norm", mode="norm", eps=1e-6):
    """Per-label Python loop straight from the formulas (float64)."""
    per = []
    for lab in range(probs.shape[1]):
        p = [float(probs[i, lab]) for i in range(probs.shape[0]) if observed[i, lab] == 1]
        u = [float(probs[i, lab]) for i in range(probs.shape[0]) if observed[i, lab] != 1]
        if not p:
            per.append(0.0)
            continue
        if mode == "norm":
            unl = sum(u) / len(u) if u else 0.0
            if positive_reduction == "norm":
                pos = math.sqrt(sum(x * x for x in p))
            else:
                pos = sum(p) / len(p)
            per.append(unl - pos)
        else:
            allv = p + u
            per.append(
                math.log(max(sum(allv) / len(allv), eps))
                - sum(math.log(max(x, eps)) for x in p) / len(p)
            )
    return sum(per), per


def naive_regularizer(model, ids, am, probs, label_idx, pos_idx, unl_idx, mu, level):
    """L' separate forward passes, one per (label, p, u, μ)."""
    out = torch.zeros(probs.shape[1])
    for lab, p, u, m in zip(label_idx.tolist(), pos_idx.tolist(), unl_idx.tolist(), mu.tolist(),
                            strict=True):
        mask = torch.maximum(am[p:p + 1], am[u:u + 1])
        if level == "embedding":
            x = m * model.embed(ids[p:p + 1]) + (1 - m) * model.embed(ids[u:u + 1])
            z = model.pool(model.encode(x, mask), mask)
        elif level == "encoder":
            hp = model.encode(model.embed(ids[p:p + 1]), am[p:p + 1])
            hu = model.encode(model.embed(ids[u:u + 1]), am[u:u + 1])
            z = model.pool(m * hp + (1 - m) * hu, mask)
        else:
            zp = model(ids[p:p + 1], am[p:p + 1])[1]
            zu = model(ids[u:u + 1], am[u:u + 1])[1]
            z = m * zp + (1 - m) * zu
        phi = torch.sigmoid(model.head(z)[0, lab])
        target = m + (1 - m) * probs[u, lab]
        out[lab] = (target - phi) ** 2
    return out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model() -> EncoderClassifier:
    torch.manual_seed(0)
    m = EncoderClassifier(None, N_LABELS, encoder=tiny_bert())
    return m.eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """6 rows, T=10 with different lengths (padding), observed [6, 4] with label 3 all-unlabeled."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (6, 10), generator=g)
    lengths = torch.tensor([10, 4, 7, 10, 3, 8])
    am = (torch.arange(10)[None, :] < lengths[:, None]).long()
    ids = ids * am
    observed = torch.tensor(
        [[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]]
    )
    return ids, am, observed


def _counting_hook(model: EncoderClassifier) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    handle = model.encoder.register_forward_hook(lambda mod, args, out: calls.append(1))
    return calls, handle


# --------------------------------------------------------------------------- variational loss

# 3×2 example. probs Φ = [[0.9, 0.2], [0.6, 0.7], [0.3, 0.4]], observed = [[1, 0], [1, 0], [0, 1]].
# label 0: P = {0, 1} (0.9, 0.6), U = {2} (0.3)
#   norm/norm: 0.3 − sqrt(0.81 + 0.36) = 0.3 − 1.0816653826 = −0.7816653826
#   norm/mean: 0.3 − (0.9 + 0.6)/2 = 0.3 − 0.75 = −0.45
#   log: log((0.9+0.6+0.3)/3) − (log 0.9 + log 0.6)/2 = −0.5108256238 + 0.3080930697 = −0.2027325541
# label 1: P = {2} (0.4), U = {0, 1} (0.2, 0.7)
#   norm/norm: 0.45 − sqrt(0.16) = 0.05;  norm/mean: 0.45 − 0.4 = 0.05
#   log: log((0.2+0.7+0.4)/3) − log 0.4 = −0.8362480242 + 0.9162907319 = 0.0800427077
# totals: norm/norm −0.7316653826, norm/mean −0.40, log −0.1226898464
HAND_PROBS = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.3, 0.4]], dtype=torch.float64)
HAND_OBS = torch.tensor([[1, 0], [1, 0], [0, 1]])


@pytest.mark.parametrize(
    ("kwargs", "per_label", "total"),
    [
        ({"positive_reduction": "norm"}, [-0.7816653826, 0.05], -0.7316653826),
        ({"positive_reduction": "mean"}, [-0.45, 0.05], -0.40),
        ({"mode": "log"}, [-0.2027325541, 0.0800427077], -0.1226898464),
    ],
)
def test_variational_hand_computed(kwargs, per_label, total):
    loss, per = variational_pu_loss(HAND_PROBS, HAND_OBS, **kwargs)
    assert per.tolist() == pytest.approx(per_label, abs=1e-9)
    assert float(loss) == pytest.approx(total, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 7), n_labels=st.integers(1, 5), seed=st.integers(0, 10_000),
    reduction=st.sampled_from(["norm", "mean"]), mode=st.sampled_from(["norm", "log"]),
)
def test_variational_matches_naive_loop(b, n_labels, seed, reduction, mode):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(b, n_labels, generator=g, dtype=torch.float64) * 0.98 + 0.01
    observed = (torch.rand(b, n_labels, generator=g) < 0.4).long()
    loss, per = variational_pu_loss(probs, observed, positive_reduction=reduction, mode=mode)
    ref_total, ref_per = naive_variational(probs, observed, positive_reduction=reduction, mode=mode)
    assert per.shape == (n_labels,)
    assert per.tolist() == pytest.approx(ref_per, abs=1e-9)
    assert float(loss) == pytest.approx(ref_total, abs=1e-9)


def test_empty_positive_label_contributes_zero_and_no_nan_grad():
    logits = torch.tensor([[0.3, -1.0], [1.2, 0.5], [-0.4, 2.0]], requires_grad=True)
    observed = torch.tensor([[1, 0], [0, 0], [0, 0]])  # label 1: empty P
    for mode in ("norm", "log"):
        for reduction in ("norm", "mean"):
            probs = torch.sigmoid(logits)
            loss, per = variational_pu_loss(
                probs, observed, mode=mode, positive_reduction=reduction
            )
            assert per.detach()[1].item() == 0.0
            assert per.detach()[0].item() != 0.0
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.isfinite(grad).all()
            assert torch.all(grad[:, 1] == 0)
            assert torch.any(grad[:, 0] != 0)


def test_empty_unlabeled_term_is_zero():
    probs = torch.tensor([[0.6, 0.2], [0.8, 0.5]], dtype=torch.float64)
    observed = torch.tensor([[1, 1], [1, 0]])  # label 0: every row observed positive
    _, per = variational_pu_loss(probs, observed, positive_reduction="norm")
    assert float(per[0]) == pytest.approx(-1.0, abs=1e-12)  # 0 − sqrt(0.36 + 0.64)
    _, per = variational_pu_loss(probs, observed, positive_reduction="mean")
    assert float(per[0]) == pytest.approx(-0.7, abs=1e-12)
    # log mode: first term covers U ∪ P = all rows: log(0.7) − (log 0.6 + log 0.8)/2
    _, per = variational_pu_loss(probs, observed, mode="log")
    assert float(per[0]) == pytest.approx(math.log(0.7) - (math.log(0.6) + math.log(0.8)) / 2)


def test_log_mode_log_probs_matches_probs_path_and_handles_saturation():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.5, 1.0]], dtype=torch.float64)
    observed = torch.tensor([[1, 0], [0, 1], [0, 1]])
    probs = torch.sigmoid(logits)
    a, _ = variational_pu_loss(probs, observed, mode="log")
    b, _ = variational_pu_loss(
        probs, observed, mode="log", log_probs=torch.nn.functional.logsigmoid(logits)
    )
    assert float(a) == pytest.approx(float(b), abs=1e-12)
    # A saturated positive (Φ ≈ e^-200) still gets a finite, non-zero gradient via log_probs.
    sat = torch.tensor([[-200.0], [0.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = variational_pu_loss(
        torch.sigmoid(sat), torch.tensor([[1], [0]]), mode="log",
        log_probs=torch.nn.functional.logsigmoid(sat),
    )
    (grad,) = torch.autograd.grad(loss, sat)
    assert torch.isfinite(grad).all() and float(grad[0, 0]) < -0.5


def test_variational_shape_checks():
    with pytest.raises(ValueError, match="shape"):
        variational_pu_loss(torch.rand(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="mode"):
        variational_pu_loss(torch.rand(3, 2), torch.zeros(3, 2), mode="bogus")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pairs and μ


def test_mixup_pairs_valid_and_deterministic():
    observed = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 0]])
    lab, p, u = mixup_pairs(observed, generator=torch.Generator().manual_seed(3))
    # label 2: all positive (no U); label 3: no positive -> both skipped.
    assert lab.tolist() == [0, 1]
    assert all(observed[pi, li] == 1 for li, pi in zip(lab.tolist(), p.tolist(), strict=True))
    assert all(observed[ui, li] == 0 for li, ui in zip(lab.tolist(), u.tolist(), strict=True))
    again = mixup_pairs(observed, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip((lab, p, u), again, strict=True))


def test_mixup_pairs_are_uniform_over_members():
    observed = torch.tensor([[1], [1], [1], [0], [0]])
    g = torch.Generator().manual_seed(0)
    picks = [mixup_pairs(observed, generator=g) for _ in range(600)]
    pos_counts = torch.bincount(torch.cat([p for _, p, _ in picks]), minlength=5)
    unl_counts = torch.bincount(torch.cat([u for _, _, u in picks]), minlength=5)
    assert pos_counts[3:].sum() == 0 and unl_counts[:3].sum() == 0
    assert pos_counts[:3].min() > 150 and unl_counts[3:].min() > 250  # expect 200 / 300 each


def test_sample_mu_seeded_in_range_and_leaves_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = sample_mu(50, alpha=0.3, beta=0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(1), expected_next)  # global RNG untouched
    b = sample_mu(50, alpha=0.3, beta=0.3, generator=torch.Generator().manual_seed(5))
    c = sample_mu(50, alpha=0.3, beta=0.3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (50,) and bool(((a >= 0) & (a <= 1)).all())
    near_one = sample_mu(20, alpha=1e4, beta=1e-4, generator=torch.Generator().manual_seed(0))
    assert float(near_one.min()) > 0.999
    with pytest.raises(ValueError):
        sample_mu(3, alpha=0.0, beta=1.0, generator=torch.Generator())


# --------------------------------------------------------------------------- regulariser


@pytest.mark.parametrize("level", LEVELS)
def test_regularizer_matches_naive_loop(model, batch, level):
    ids, am, observed = batch
    with torch.no_grad():
        probs = torch.sigmoid(model(ids, am)[0])
        pairs = mixup_pairs(observed, generator=torch.Generator().manual_seed(7))
        mu = sample_mu(pairs[0].numel(), alpha=0.3, beta=0.3,
                       generator=torch.Generator().manual_seed(8))
        reg, per = mixup_regularizer(
            model, ids, am, probs, observed, level=level, alpha=0.3, beta=0.3,
            generator=torch.Generator(), mu=mu, pairs=pairs,
        )
        ref = naive_regularizer(model, ids, am, probs, *pairs, mu, level)
    assert pairs[0].tolist() == [0, 1, 2]  # label 3 has no positive
    assert per[3] == 0
    assert bool((per[:3] > 0).all())
    torch.testing.assert_close(per, ref, atol=1e-5, rtol=0)
    assert float(reg) == pytest.approx(float(ref.sum()), abs=1e-5)


def test_regularizer_sampling_path_is_seeded(model, batch):
    ids, am, observed = batch
    with torch.no_grad():
        probs = torch.sigmoid(model(ids, am)[0])
        runs = [
            mixup_regularizer(model, ids, am, probs, observed, alpha=0.3, beta=0.3,
                              generator=torch.Generator().manual_seed(s))[1]
            for s in (11, 11, 12)
        ]
        # Same generator stream: pairs first, then μ.
        g = torch.Generator().manual_seed(11)
        pairs = mixup_pairs(observed, generator=g)
        mu = sample_mu(pairs[0].numel(), alpha=0.3, beta=0.3, generator=g)
        ref = naive_regularizer(model, ids, am, probs, *pairs, mu, "embedding")
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    torch.testing.assert_close(runs[0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", LEVELS)
def test_mu_weights_the_positive_side(model, level):
    """μ=1: x̃ is the positive and Φ̃ = 1; μ=0: x̃ is the unlabeled row and Φ̃ = Φ_l(u)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 128, (4, 6), generator=g)
    am = torch.ones_like(ids)  # equal masks, so the union mask is each row's own mask
    observed = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    with torch.no_grad():
        probs = torch.sigmoid(model(ids, am)[0])
        pairs = mixup_pairs(observed, generator=g)
        lab, p, u = pairs
        ones, zeros = torch.ones(lab.numel()), torch.zeros(lab.numel())
        phi_one = mixed_label_probs(model, ids, am, lab, p, u, ones, level=level)
        phi_zero = mixed_label_probs(model, ids, am, lab, p, u, zeros, level=level)
        torch.testing.assert_close(phi_one, probs[p, lab], atol=1e-5, rtol=0)
        torch.testing.assert_close(phi_zero, probs[u, lab], atol=1e-5, rtol=0)
        _, per_one = mixup_regularizer(model, ids, am, probs, observed, level=level, alpha=1.0,
                                       beta=1.0, generator=g, mu=ones, pairs=pairs)
        _, per_zero = mixup_regularizer(model, ids, am, probs, observed, level=level, alpha=1.0,
                                        beta=1.0, generator=g, mu=zeros, pairs=pairs)
        # Beta(1e4, 1e-4) draws μ ≈ 1 through the sampling path.
        _, per_sampled = mixup_regularizer(model, ids, am, probs, observed, level=level,
                                           alpha=1e4, beta=1e-4, generator=g, pairs=pairs)
    expected = torch.zeros(N_LABELS)
    expected[lab] = (1 - probs[p, lab]) ** 2
    torch.testing.assert_close(per_one, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_sampled, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(per_zero, torch.zeros(N_LABELS), atol=1e-6, rtol=0)


def test_batched_forward_is_one_encoder_call(model, batch):
    ids, am, observed = batch
    with torch.no_grad():
        logits, _ = model(ids, am)
        hidden = model.encode(model.embed(ids), am)
        pooled = model.pool(hidden, am)
    probs = torch.sigmoid(logits)
    cases = [
        ("embedding", {}, 1),
        ("encoder", {}, 1),  # hidden states recomputed for the pair rows in one pass
        ("pooled", {}, 1),
        ("encoder", {"hidden": hidden}, 0),  # reuses the main forward's hidden states
        ("pooled", {"pooled": pooled}, 0),
    ]
    for level, extra, n_calls in cases:
        calls, handle = _counting_hook(model)
        try:
            with torch.no_grad():
                mixup_regularizer(model, ids, am, probs, observed, level=level, alpha=0.3,
                                  beta=0.3, generator=torch.Generator().manual_seed(0), **extra)
        finally:
            handle.remove()
        assert len(calls) == n_calls, (level, extra.keys())
    calls, handle = _counting_hook(model)
    try:
        dallmi_loss(model, ids, am, observed, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(calls) == 2  # main forward + one batched MixUp forward


@pytest.mark.parametrize("level", LEVELS)
def test_regularizer_gradient_flows_and_grad_false_detaches(model, batch, level):
    ids, am, observed = batch
    params = [model.encoder.get_input_embeddings().weight, model.classifier.weight]
    logits, _ = model(ids, am)
    probs = torch.sigmoid(logits)
    reg, per = mixup_regularizer(model, ids, am, probs, observed, level=level, alpha=0.3,
                                 beta=0.3, generator=torch.Generator().manual_seed(4))
    assert reg.requires_grad and reg.detach().item() > 0
    grads = torch.autograd.grad(reg, params)
    assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)

    reg_off, per_off = mixup_regularizer(model, ids, am, probs, observed, level=level, alpha=0.3,
                                         beta=0.3, generator=torch.Generator().manual_seed(4),
                                         grad=False)
    assert not reg_off.requires_grad and not per_off.requires_grad
    torch.testing.assert_close(per_off, per.detach())  # same value, no gradient path


def test_detach_target_stops_gradient_through_target(model, batch):
    ids, am, observed = batch
    logits = model(ids, am)[0].detach().requires_grad_(True)
    probs = torch.sigmoid(logits)
    kw = dict(alpha=0.3, beta=0.3, level="pooled")
    reg, _ = mixup_regularizer(model, ids, am, probs, observed,
                               generator=torch.Generator().manual_seed(1), **kw)
    (g_on,) = torch.autograd.grad(reg, logits)
    reg, _ = mixup_regularizer(model, ids, am, probs, observed, detach_target=True,
                               generator=torch.Generator().manual_seed(1), **kw)
    assert g_on.abs().sum() > 0
    assert not reg.requires_grad or torch.autograd.grad(reg, logits, allow_unused=True)[0] is None


def test_regularizer_without_pairs_is_zero(model):
    ids = torch.randint(1, 128, (2, 5))
    am = torch.ones_like(ids)
    probs = torch.full((2, N_LABELS), 0.5)
    observed = torch.zeros(2, N_LABELS)  # no positive anywhere
    reg, per = mixup_regularizer(model, ids, am, probs, observed, alpha=0.3, beta=0.3,
                                 generator=torch.Generator())
    assert float(reg) == 0.0 and per.shape == (N_LABELS,)


# --------------------------------------------------------------------------- total loss


@pytest.mark.parametrize(("mode", "level"), [("norm", "embedding"), ("log", "encoder")])
def test_dallmi_loss_combines_terms(model, batch, mode, level):
    ids, am, observed = batch
    out = dallmi_loss(model, ids, am, observed, generator=torch.Generator().manual_seed(9),
                      lam=0.5, level=level, mode=mode)
    probs = torch.sigmoid(out.logits)
    var, var_per = variational_pu_loss(probs, observed, mode=mode)
    torch.testing.assert_close(out.per_label_variational, var_per, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, var + 0.5 * out.regularizer)
    torch.testing.assert_close(out.regularizer, out.per_label_regularizer.sum())
    assert out.logits.shape == (6, N_LABELS) and out.pooled.shape == (6, model.hidden_size)
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_dallmi_loss_mixup_grad_false_leaves_only_variational_gradient(model, batch):
    ids, am, observed = batch
    weight = model.classifier.weight
    out = dallmi_loss(model, ids, am, observed, generator=torch.Generator().manual_seed(9),
                      mixup_grad=False)
    (g_total,) = torch.autograd.grad(out.loss, weight, retain_graph=True)
    (g_var,) = torch.autograd.grad(out.variational, weight)
    torch.testing.assert_close(g_total, g_var)
    assert float(out.regularizer) > 0
