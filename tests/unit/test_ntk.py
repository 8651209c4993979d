"""NTK-Selector core: per-sample gradients, the Jacobian-free kernel, projection, scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydapt.select.ntk import (
    MeanAccumulator,
    RademacherProjector,
    adam_precondition,
    adam_second_moments,
    flat_dim,
    less_scores,
    ntk_scores,
    per_sample_grads,
    summed_logit_objective,
    top_n,
    trainable_params,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# torch.func has no CPU batching rule for fused SDPA and says so; vmap then loops over it (exact).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

VOCAB = 64


def _tiny_lora_lm(attn: str = "sdpa", *, seed: int = 0) -> torch.nn.Module:
    """A 2-layer random-init Llama with random (non-zero) LoRA r=4 on q_proj, v_proj."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, attn_implementation=attn,
    )
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(base, lora).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster (no OpenMP hand-offs on 32-wide tensors)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _tiny_lora_lm()


def _samples(
    lengths: list[int], *, prompt: int = 2, seed: int = 1
) -> tuple[list[torch.Tensor], int]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths], prompt


def _pad(seqs: list[torch.Tensor], prompt: int, *, side: str):
    """Pad sequences to one batch → ids, attention mask, response mask (all [B, T])."""
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    am = torch.zeros_like(ids)
    rm = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        n = len(s)
        sl = slice(t - n, t) if side == "left" else slice(0, n)
        ids[i, sl] = s
        am[i, sl] = 1
        resp = torch.zeros(n, dtype=torch.long)
        resp[prompt:] = 1
        rm[i, sl] = resp
    return ids, am, rm


def _reference_grads(model, seqs, prompt, *, objective: str) -> torch.Tensor:
    """Independent reference: per-sample loop through the live model + autograd.grad, with the
    objective written out by hand (no raydapt code on this path)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for s in seqs:
        logits = model(input_ids=s[None]).logits[0].float()  # [L, V]
        if objective == "logit_sum":
            f = logits[prompt:].sum() / (len(s) - prompt)
        else:
            f = torch.nn.functional.cross_entropy(logits[prompt - 1 : -1], s[prompt:])
        gs = torch.autograd.grad(f, params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- (a) the Jacobian-free kernel ------------------------------------------------------------


def test_summed_logit_objective_by_hand() -> None:
    # seeded: an unseeded draw made this test depend on the tests before it
    logits = torch.randn(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    want = [
        sum(logits[b, t].sum().item() for t in range(5) if mask[b, t]) / max(int(mask[b].sum()), 1)
        for b in range(3)
    ]
    got = summed_logit_objective(logits.to(torch.bfloat16), mask)
    assert got.dtype == torch.float32
    # the objective is float32 (asserted above): compare at float32 precision, which a
    # mean that nearly cancels (|value| ~ 0.03 from terms ~ 1) can miss relatively
    np.testing.assert_allclose(
        summed_logit_objective(logits, mask).numpy(), np.array(want), rtol=1e-6, atol=1e-6
    )
    assert got[2].item() == 0.0


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_kernel_matches_explicit_loop(model, method: str) -> None:
    seqs, prompt = _samples([9, 6, 11, 7])
    ids, am, rm = _pad(seqs, prompt, side="right")
    g = per_sample_grads(model, ids, am, rm, method=method)
    assert g.shape == (4, flat_dim(trainable_params(model)))
    ref = _reference_grads(model, seqs, prompt, objective="logit_sum")
    k, k_ref = g @ g.T, ref @ ref.T  # Θ̃(x, x') = ⟨∇F(x), ∇F(x')⟩
    assert _rel(k, k_ref) <= 1e-5
    # The loop baseline is the same kernel too.
    g_loop = per_sample_grads(model, ids, am, rm, method="loop")
    assert _rel(g_loop @ g_loop.T, k_ref) <= 1e-5


# -- (b) batched == per sample, padding included ----------------------------------------------


@pytest.mark.parametrize("method", ["hooks", "vmap"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("objective", ["logit_sum", "loss"])
def test_batched_equals_each_sample_alone(model, side: str, objective: str, method: str) -> None:
    seqs, prompt = _samples([10, 4, 7], seed=2)
    ids, am, rm = _pad(seqs, prompt, side=side)
    batched = per_sample_grads(model, ids, am, rm, objective=objective, method=method)
    loop = per_sample_grads(model, ids, am, rm, objective=objective, method="loop")
    ref = _reference_grads(model, seqs, prompt, objective=objective)
    for i, s in enumerate(seqs):
        ones = torch.ones(1, len(s), dtype=torch.long)
        resp = ones.clone()
        resp[0, :prompt] = 0
        alone = per_sample_grads(model, s[None], ones, resp, objective=objective,
                                 method=method)[0]
        assert _rel(batched[i], ref[i]) <= 1e-5
        assert _rel(batched[i], alone) <= 1e-5
        assert _rel(loop[i], ref[i]) <= 1e-5


def _tiny_gpt2_lora(*, seed: int = 0) -> torch.nn.Module:
    """GPT-2 has absolute position embeddings: a left-padded sample is only right when the
    positions restart at its first real token."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )
    lora = peft.LoraConfig(
        r=4, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True
    )
    return peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), lora).eval()


@pytest.mark.parametrize("method", ["hooks", "vmap"])
@pytest.mark.parametrize("arch", ["llama-eager", "llama-sdpa", "gpt2"])
def test_padding_invariance_across_architectures(arch: str, method: str) -> None:
    m = _tiny_gpt2_lora(seed=3) if arch == "gpt2" else _tiny_lora_lm(arch.split("-")[1], seed=3)
    seqs, prompt = _samples([8, 3, 12], seed=4)
    left = per_sample_grads(m, *_pad(seqs, prompt, side="left"), method=method)
    right = per_sample_grads(m, *_pad(seqs, prompt, side="right"), method=method,
                             chunk_size=2 if method == "vmap" else None)
    ref = _reference_grads(m, seqs, prompt, objective="logit_sum")
    assert _rel(left, ref) <= 1e-5
    assert _rel(right, ref) <= 1e-5


def test_explicit_params_and_state_restored(model) -> None:
    seqs, prompt = _samples([6, 5], seed=5)
    ids, am, rm = _pad(seqs, prompt, side="right")
    params = trainable_params(model)
    sub = dict(list(params.items())[:2])
    model.train()
    g = per_sample_grads(model, ids, am, rm, params=sub)
    assert model.training
    model.eval()
    full = per_sample_grads(model, ids, am, rm)
    assert g.shape == (2, flat_dim(sub))
    assert torch.allclose(g, full[:, : flat_dim(sub)], rtol=1e-5, atol=1e-7)


def test_rows_without_response_or_tokens_have_zero_gradient(model) -> None:
    seqs, prompt = _samples([6, 5, 7], seed=8)
    ids, am, rm = _pad(seqs, prompt, side="left")
    rm[1] = 0  # prompt only: F = 0 by definition
    am[2] = 0  # all padding
    rm[2] = 0
    for method in ("hooks", "vmap", "loop"):
        g = per_sample_grads(model, ids, am, rm, method=method)
        assert g[0].abs().sum() > 0
        assert torch.equal(g[1:], torch.zeros_like(g[1:]))


def test_hooks_without_the_vocabulary_shortcut_and_bad_params() -> None:
    """LoRA on the output layer too: Σ_k logits is no longer h · w̄ with a fixed w̄, so the
    hooks path takes the full logits, and still equals the reference. A parameter that is not
    an nn.Linear weight is refused with a clear message (vmap handles it)."""
    torch.manual_seed(6)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"],
                           init_lora_weights=False)
    m = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lora).eval()
    assert any("lm_head" in n for n in trainable_params(m))
    seqs, prompt = _samples([7, 10], seed=9)
    g = per_sample_grads(m, *_pad(seqs, prompt, side="left"), method="hooks")
    assert _rel(g, _reference_grads(m, seqs, prompt, objective="logit_sum")) <= 1e-5
    emb = {n: p for n, p in m.named_parameters() if n.endswith("embed_tokens.weight")}
    with pytest.raises(ValueError, match="nn.Linear weight.*method='vmap'"):
        per_sample_grads(m, *_pad(seqs, prompt, side="right"), params=emb, method="hooks")
    g_v = per_sample_grads(m, *_pad(seqs, prompt, side="right"), params=emb, method="vmap")
    g_l = per_sample_grads(m, *_pad(seqs, prompt, side="right"), params=emb, method="loop")
    assert _rel(g_v, g_l) <= 1e-5


# -- (c) projection preserves inner products (Johnson–Lindenstrauss) --------------------------


def test_projection_preserves_inner_products() -> None:
    """k = 4096, unit vectors in R^3000. Each entry of Π is ±1/√k, so ⟨Πa,Πb⟩ is unbiased with
    Var = (‖a‖²‖b‖² + ⟨a,b⟩² − 2Σa_i²b_i²)/k ≤ 2/k. Rigorous per pair (Achlioptas 2003 norm bound
    + polarisation over a±b): P(|⟨Πa,Πb⟩ − ⟨a,b⟩| > ε) ≤ 4·exp(−k(ε²/2 − ε³/3)/2), which for
    ε = 0.12 is 5e-6; over 780 pairs the union bound leaves < 0.5 % for any seed. The RMS error
    must also sit below the √(2/k) standard-deviation bound (and not be ~0: a real projection)."""
    k, n, m = 4096, 3000, 40
    g = torch.Generator().manual_seed(7)
    base = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = base + 0.8 * base[torch.arange(m).roll(1)]  # correlated pairs: ⟨a,b⟩ far from 0
    x = torch.nn.functional.normalize(mix, dim=1)
    proj = RademacherProjector(n, k, seed=123, chunk_rows=512, block_rows=128)
    px = proj.project(x.float()).double()
    iu = torch.triu_indices(m, m, offset=1)
    exact = (x @ x.T)[iu[0], iu[1]]
    approx = (px @ px.T)[iu[0], iu[1]]
    err = (approx - exact).abs()
    assert exact.abs().max() > 0.3
    assert err.max() <= 0.12
    rms = err.pow(2).mean().sqrt()
    assert 0.3 / math.sqrt(k) <= rms <= math.sqrt(2 / k)
    # norms (the a = b case) within the same bound
    assert (px.norm(dim=1).pow(2) - 1).abs().max() <= 0.12


def test_projector_entries_are_scaled_signs() -> None:
    proj = RademacherProjector(300, 200, seed=0, chunk_rows=128, block_rows=64)
    chunks = [c.clone() for _, _, c in proj.iter_chunks()]
    mat = torch.cat(chunks)  # only in a test, on a tiny projector
    assert mat.shape == (300, 200)
    assert set(torch.unique(mat * math.sqrt(200)).tolist()) == {-1.0, 1.0}
    assert abs(mat.sign().mean().item()) < 0.02  # balanced signs (60k draws: σ ≈ 0.004)
    e = torch.eye(300)
    assert torch.allclose(proj.project(e), mat)  # project() really multiplies by Π


# -- (d) projector determinism, chunking, memory ----------------------------------------------


def test_projector_deterministic_and_chunk_independent() -> None:
    g = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    a = RademacherProjector(1000, 256, seed=42, chunk_rows=64, block_rows=32).project(g)
    b = RademacherProjector(1000, 256, seed=42, chunk_rows=32, block_rows=32).project(g)
    c = RademacherProjector(1000, 256, seed=42, chunk_rows=1024, block_rows=32).project(g)
    d = RademacherProjector(1000, 256, seed=43, chunk_rows=64, block_rows=32).project(g)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    assert (a - d).abs().max() > 0.1  # another seed → another projection
    single = RademacherProjector(1000, 256, seed=42, chunk_rows=64, block_rows=32).project(g[2])
    torch.testing.assert_close(single, a[2], rtol=1e-5, atol=1e-5)
    # a non-multiple-of-64 width is the prefix of the wider draws of the same rows
    narrow = RademacherProjector(1000, 100, seed=42, chunk_rows=64, block_rows=32)
    wide = RademacherProjector(1000, 128, seed=42, chunk_rows=64, block_rows=32)
    (_, _, cn), (_, _, cw) = next(narrow.iter_chunks()), next(wide.iter_chunks())
    assert torch.equal(cn.sign(), cw[:, :100].sign())


def test_projector_streams_in_bounded_chunks(monkeypatch) -> None:
    in_dim, out_dim, chunk_rows = 1000, 256, 96
    proj = RademacherProjector(in_dim, out_dim, seed=1, chunk_rows=chunk_rows, block_rows=32)
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    inner = proj.iter_chunks

    def spy(**kw):
        for start, stop, chunk in inner(**kw):
            seen.append((start, stop, tuple(chunk.shape)))
            assert chunk.numel() <= chunk_rows * out_dim < in_dim * out_dim
            assert chunk.untyped_storage().nbytes() <= proj.max_chunk_floats * 4
            yield start, stop, chunk

    monkeypatch.setattr(proj, "iter_chunks", spy)
    proj.project(torch.randn(3, in_dim))
    assert len(seen) == math.ceil(in_dim / chunk_rows)
    assert seen[0][0] == 0 and seen[-1][1] == in_dim
    assert all(s[2] == (s[1] - s[0], out_dim) for s in seen)
    with pytest.raises(ValueError):
        RademacherProjector(10, 8, seed=0, chunk_rows=50, block_rows=32)


# -- (e) scores ---------------------------------------------------------------------------------


def test_ntk_scores_by_hand_and_top_n() -> None:
    rng = np.random.default_rng(0)
    dom = rng.normal(size=(6, 16)).astype(np.float32)
    pool = rng.normal(size=(20, 16)).astype(np.float32)
    mean = dom.mean(axis=0)
    inner = pool @ mean
    cosine = inner / (np.linalg.norm(pool, axis=1) * np.linalg.norm(mean))
    got = ntk_scores(torch.from_numpy(dom), torch.from_numpy(pool))
    np.testing.assert_allclose(got.numpy(), inner, rtol=1e-5, atol=1e-6)
    got_cos = ntk_scores(torch.from_numpy(dom), torch.from_numpy(pool), kind="cosine")
    np.testing.assert_allclose(got_cos.numpy(), cosine, rtol=1e-5, atol=1e-6)
    # a precomputed mean gives the same scores
    np.testing.assert_allclose(
        ntk_scores(torch.from_numpy(mean), torch.from_numpy(pool)).numpy(), inner, rtol=1e-5
    )
    idx = top_n(got, 5)
    assert idx.tolist() == list(np.argsort(-inner, kind="stable")[:5])
    assert top_n(torch.tensor([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]  # ties: lower first
    # cosine and inner rank differently in general; scaling a candidate only moves it for inner
    pool2 = pool.copy()
    pool2[0] *= 100.0
    s_in = ntk_scores(torch.from_numpy(dom), torch.from_numpy(pool2))
    s_cos = ntk_scores(torch.from_numpy(dom), torch.from_numpy(pool2), kind="cosine")
    np.testing.assert_allclose(s_cos.numpy(), cosine, rtol=1e-5, atol=1e-6)
    assert s_in[0].item() == pytest.approx(100.0 * inner[0], rel=1e-5)


def test_mean_accumulator_streams_and_merges() -> None:
    x = torch.randn(50, 8)
    a = MeanAccumulator()
    for batch in x[:30].split(7):
        a.update(batch)
    b = MeanAccumulator().update(x[30:])
    a.merge(b)
    assert a.count == 50
    torch.testing.assert_close(a.mean, x.mean(0))
    with pytest.raises(ValueError):
        _ = MeanAccumulator().mean


def test_less_scores_by_hand() -> None:
    rng = np.random.default_rng(1)
    dom = rng.normal(size=(4, 10)).astype(np.float32)
    pool = rng.normal(size=(7, 10)).astype(np.float32)
    v = rng.uniform(0.01, 2.0, size=10).astype(np.float32)
    eps = 1e-8

    def cos(a, b):
        return (a @ b.T) / (np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None])

    plain = cos(pool, dom)
    pre = cos(pool / (np.sqrt(v) + eps), dom)
    t = torch.from_numpy
    np.testing.assert_allclose(less_scores(t(dom), t(pool)).numpy(), plain.max(1), rtol=1e-5)
    np.testing.assert_allclose(
        less_scores(t(dom), t(pool), reduce="mean").numpy(), plain.mean(1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        less_scores(t(dom), t(pool), adam_state=t(v)).numpy(), pre.max(1), rtol=1e-5
    )


def test_adam_second_moments_flatten_in_gradient_order(model) -> None:
    params = trainable_params(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    seqs, prompt = _samples([6, 8], seed=6)
    ids, am, rm = _pad(seqs, prompt, side="right")
    g = per_sample_grads(model, ids, am, rm, objective="loss")
    for p, gp in zip(params.values(), _unflatten(g.mean(0), params), strict=True):
        p.grad = gp.clone()
    saved = {n: p.detach().clone() for n, p in params.items()}
    opt.step()
    v = adam_second_moments(opt, params)
    assert v.shape == (flat_dim(params),)
    b2 = opt.param_groups[0]["betas"][1]
    torch.testing.assert_close(v, (1 - b2) * g.mean(0).pow(2), rtol=1e-5, atol=1e-12)
    pre = adam_precondition(g, exp_avg_sq=v)
    assert pre.shape == g.shape
    with torch.no_grad():  # leave the shared fixture as it was
        for n, p in params.items():
            p.copy_(saved[n])
            p.grad = None


def _unflatten(flat: torch.Tensor, params) -> list[torch.Tensor]:
    out, i = [], 0
    for p in params.values():
        out.append(flat[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out
