"""NTK-Selector core in plain PyTorch: per-sample gradients, Rademacher projection, scores.

The Jacobian-free NTK (methods.md, section 3) replaces the vocabulary-sized Jacobian kernel by the
kernel of one scalar per sample::

    F(x)        = (1/|R(x)|) Σ_{t∈R(x)} Σ_k f_k(x)_t      # logits summed over vocab and response
    Θ̃(x, x')    = ⟨∇_θ F(x), ∇_θ F(x')⟩                    # θ = the LoRA (trainable) parameters
    g(x)        = Π ∇_θ F(x)                               # Π: p × P Rademacher, ±1/√p
    s_j         = ⟨ḡ_D, g(c_j)⟩   (or cosine)              # ḡ_D = mean domain gradient

Pipeline pieces, all on tensors (no Ray here; the Ray stages call these per shard)::

    G  = per_sample_grads(model, ids, am, rm)      # [B, P]   one gradient of F per sample
    g  = RademacherProjector(P, 8192, seed=0).project(G)   # [B, p]
    acc = MeanAccumulator(); acc.update(g_domain)  # ḡ_D over batches / shards
    s  = ntk_scores(acc.mean, g_pool)              # [Nc]
    idx = top_n(s, n=N)                            # selected pool indices

The LESS baseline reuses the gradient code with ``objective="loss"`` and scores with
:func:`less_scores` (Adam-preconditioned, cosine, max over domain samples).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Objective = Literal["logit_sum", "loss"]
GradMethod = Literal["hooks", "vmap", "loop"]
ScoreKind = Literal["inner", "cosine"]

__all__ = [
    "MeanAccumulator",
    "RademacherProjector",
    "adam_precondition",
    "adam_second_moments",
    "causal_attention_bias",
    "flat_dim",
    "less_scores",
    "ntk_scores",
    "per_sample_grads",
    "response_loss_objective",
    "summed_logit_objective",
    "top_n",
    "trainable_params",
]


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------


def summed_logit_objective(logits: Tensor, response_mask: Tensor) -> Tensor:
    """F(x): logits summed over the vocabulary and the response positions, length-normalised.

    Args:
        logits: [B, T, V] the model's output logits (any float dtype; summed in fp32).
        response_mask: [B, T] 1 where position t is a response token (its output logits count).

    Returns:
        [B] fp32, ``F_b = Σ_t m_bt Σ_k logits_btk / Σ_t m_bt`` (0 for a sample without response
        tokens, whose gradient is then 0).
    """
    m = response_mask.to(torch.float32)
    per_pos = logits.to(torch.float32).sum(dim=-1)  # [B, T]
    return (per_pos * m).sum(dim=-1) / m.sum(dim=-1).clamp_min(1.0)


def response_loss_objective(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the response tokens (LESS's objective).

    The logits at position t predict token t+1; token t+1 counts when ``response_mask[t+1]`` is 1.

    Args:
        logits: [B, T, V] output logits (cross-entropy computed in fp32).
        input_ids: [B, T] the token ids (targets are ``input_ids[:, 1:]``).
        response_mask: [B, T] 1 on response tokens (0 on prompt and padding).

    Returns:
        [B] fp32 mean cross-entropy per sample (0 for a sample without response tokens).
    """
    pred = logits[:, :-1].to(torch.float32)  # [B, T-1, V]
    target = input_ids[:, 1:]  # [B, T-1]
    m = response_mask[:, 1:].to(torch.float32)
    ce = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")  # [B, T-1]
    return (ce * m).sum(dim=-1) / m.sum(dim=-1).clamp_min(1.0)


def _objective(
    objective: Objective, logits: Tensor, input_ids: Tensor, response_mask: Tensor
) -> Tensor:
    """Dispatch: [B, T, V] logits → [B] objective values."""
    if objective == "logit_sum":
        return summed_logit_objective(logits, response_mask)
    if objective == "loss":
        return response_loss_objective(logits, input_ids, response_mask)
    raise ValueError(f"unknown objective {objective!r} (expected 'logit_sum' or 'loss')")


# ---------------------------------------------------------------------------------------------
# Per-sample gradients
# ---------------------------------------------------------------------------------------------


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """The parameters with ``requires_grad`` (the LoRA A/B matrices of a peft model), in
    ``named_parameters`` order, which is the order of the flattened gradient columns."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def flat_dim(params: Mapping[str, Tensor]) -> int:
    """P, the length of a flattened gradient over ``params``."""
    return sum(int(p.numel()) for p in params.values())


def causal_attention_bias(attention_mask: Tensor, *, dtype: torch.dtype) -> Tensor:
    """Additive causal + key-padding attention bias for a single sequence.

    Built with tensor ops only (no data-dependent control flow), so it works under ``vmap``.
    Padding query rows may attend to themselves, so no softmax row is fully masked (a fully masked
    row yields NaN, and NaN · 0 would still poison the gradients).

    Args:
        attention_mask: [T] 1 for real tokens, 0 for padding.
        dtype: the model's compute dtype (the bias is 0 or ``finfo(dtype).min``).

    Returns:
        [1, 1, T, T] bias: 0 where query t may attend to key s (s ≤ t and s is a real token).
    """
    t = attention_mask.shape[-1]
    dev = attention_mask.device
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    eye = torch.eye(t, dtype=torch.bool, device=dev)
    allowed = causal & (attention_mask.bool()[None, :] | eye)
    bias = torch.zeros(t, t, dtype=dtype, device=dev)
    bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)
    return bias[None, None]


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model's input embeddings (used for the attention bias)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return emb.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _single_objective_fn(
    model: nn.Module, objective: Objective, dtype: torch.dtype
) -> Callable[[dict[str, Tensor], Tensor, Tensor, Tensor], Tensor]:
    """F(params, ids [T], am [T], rm [T]) → scalar for one padded sequence (vmap-able).

    Positions are ``cumsum(am) - 1`` so a left-padded sequence sees the same positions as the
    sequence alone; the attention bias hides padding keys. Both are needed for padded samples to
    get exactly the gradient of the unpadded sample.
    """

    def fn(params: dict[str, Tensor], ids: Tensor, am: Tensor, rm: Tensor) -> Tensor:
        am = am.to(torch.long)
        pos = (am.cumsum(dim=-1) - 1).clamp_min(0)
        out = functional_call(
            model,
            params,
            args=(),
            kwargs={
                "input_ids": ids[None],
                "attention_mask": causal_attention_bias(am, dtype=dtype),
                "position_ids": pos[None],
                "use_cache": False,
            },
            strict=False,
        )
        rm = rm * am.to(rm.dtype)
        return _objective(objective, out.logits, ids[None], rm[None])[0]

    return fn


def _flatten(grads: Mapping[str, Tensor], names: list[str], batch: int) -> Tensor:
    """Per-parameter per-sample grads {name: [B, *shape]} → [B, P] fp32 in ``names`` order."""
    return torch.cat([grads[n].reshape(batch, -1).to(torch.float32) for n in names], dim=1)


def per_sample_grads(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    objective: Objective = "logit_sum",
    method: GradMethod = "hooks",
    chunk_size: int | None = None,
) -> Tensor:
    """Flattened per-sample gradient of the objective w.r.t. the trainable parameters.

    Args:
        model: a causal LM (e.g. a peft LoRA model); its forward must accept ``input_ids``,
            ``attention_mask`` (a prepared 4-D additive mask), ``position_ids`` and ``use_cache``
            and return ``.logits``.
        input_ids: [B, T] token ids, left- or right-padded.
        attention_mask: [B, T] 1 for real tokens, 0 for padding.
        response_mask: [B, T] 1 on response tokens (ANDed with ``attention_mask``).
        params: {name: tensor} to differentiate against (names as in ``named_parameters``);
            default :func:`trainable_params` (the LoRA parameters). All other parameters and
            buffers are the model's own, held fixed.
        objective: ``logit_sum`` (F, :func:`summed_logit_objective`, NTK-Selector) or ``loss``
            (:func:`response_loss_objective`, LESS).
        method: ``hooks`` (default) — batched: one forward and one backward of the whole
            batch (Σ_b F_b; the samples do not interact, so the gradient reaching sample b's
            activations is ∂F_b/∂activations_b), with each trainable ``nn.Linear`` weight's
            per-sample gradient rebuilt from its saved input x [B, T, in] and output gradient
            δ [B, T, out] as ``einsum('bto,bti->boi', δ, x)`` (the LoRA A/B matrices are such
            layers). Padding is moved to the right internally (exact: a sample's gradient does
            not depend on its padding). The [B, T, V] logits are never materialised: for
            ``logit_sum`` Σ_k logits_tk = h_t · Σ_k W_k (W the output embedding), so F comes
            from the final hidden states h [B, T, H] and one H-vector; for ``loss`` the output
            layer runs only on the positions that predict response tokens (models with logit
            soft-capping or scaling, or a differentiated output layer, take the full logits).
            Needs every parameter in ``params`` to be the weight of an ``nn.Linear`` called
            once per forward (true for LoRA); ``vmap`` covers the rest.
            ``vmap`` — batched with ``torch.func``: ``vmap(grad(F))`` over the samples with
            the parameters shared (``functional_call``); each sample runs as a [1, T] sequence
            with its own causal + padding bias and positions ``cumsum(mask) - 1``.
            ``loop`` — one forward/backward per sample (``autograd.grad``) on the sample with
            its padding removed, through the model's normal masking path: LESS's structure,
            the baseline and the reference.
        chunk_size: ``vmap`` only: samples per vectorised chunk (bounds activation memory;
            None = the whole batch at once).

    Returns:
        [B, P] fp32 gradients; columns follow ``params`` order (:func:`flat_dim` gives P).

    Why the ``vmap`` path builds its own mask: transformers' mask builder branches on the data
    (``padding_mask.all()``), which ``vmap`` refuses; a prepared 4-D bias is passed through as-is.
    Memory: like one batched backward of B sequences of length T (logits [B, T, V] included);
    ``chunk_size`` caps it. Ops without a ``vmap`` batching rule (fused SDPA on CPU) fall back
    to a per-sample loop inside the vmap — exact, just less batched.

    The model runs in eval mode (dropout off) and its train/eval state is restored afterwards.
    Sliding-window attention is not applied by the ``vmap`` path's full causal bias (matters only
    for sequences longer than the window).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape or response_mask.shape != input_ids.shape:
        raise ValueError("input_ids, attention_mask and response_mask must have the same [B, T]")
    if params is None:
        params = trainable_params(model)
    if not params:
        raise ValueError("no parameters to differentiate (no trainable parameters in the model)")
    names = list(params)
    was_training = model.training
    model.eval()
    try:
        if method == "hooks":
            return _grads_hooks(
                model, input_ids, attention_mask, response_mask,
                params=params, names=names, objective=objective,
            )
        if method == "vmap":
            return _grads_vmap(
                model, input_ids, attention_mask, response_mask,
                params=params, names=names, objective=objective, chunk_size=chunk_size,
            )
        if method == "loop":
            return _grads_loop(
                model, input_ids, attention_mask, response_mask,
                params=params, names=names, objective=objective,
            )
        raise ValueError(f"unknown method {method!r} (expected 'hooks', 'vmap' or 'loop')")
    finally:
        model.train(was_training)


def _linear_modules(model: nn.Module, names: list[str]) -> list[nn.Linear]:
    """The ``nn.Linear`` owning each parameter name (as its ``weight``), or a clear error."""
    mods = []
    for n in names:
        owner, _, leaf = n.rpartition(".")
        mod = model.get_submodule(owner) if owner else model
        if not isinstance(mod, nn.Linear) or leaf != "weight":
            raise ValueError(
                f"method='hooks' needs every differentiated parameter to be an nn.Linear weight; "
                f"{n!r} is not (use method='vmap')"
            )
        mods.append(mod)
    return mods


def _right_pad(*rows: Tensor, attention_mask: Tensor) -> list[Tensor]:
    """Move every row's real tokens to the front (stable), for tensors shaped like the mask."""
    order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)
    return [r.gather(1, order) for r in rows]


def _decoder_and_head(model: nn.Module, names: list[str]) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, output layer) when logits = head(decoder(x).last_hidden_state) exactly (a plain
    bias-free linear output layer that is not differentiated, no soft-capping or logit scaling),
    so the objectives can touch only the vocabulary rows they need; else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    cfg = getattr(base, "config", None)
    if not isinstance(head, nn.Linear) or head.bias is not None or cfg is None or \
            not hasattr(base, "get_decoder"):
        return None
    if any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale",
                                           "logits_scaling", "output_multiplier_scale")):
        return None
    head_params = {id(p) for p in head.parameters()}
    named = dict(model.named_parameters())
    if any(id(named[n]) in head_params for n in names if n in named):
        return None
    decoder = base.get_decoder()
    return None if decoder is base else (decoder, head)


def _objective_via_hidden(objective: Objective, h: Tensor, head: nn.Linear, ids: Tensor,
                          rm: Tensor) -> Tensor:
    """The objectives from final hidden states h [B, T, H] without the [B, T, V] logits.

    ``logit_sum``: Σ_k logits_tk = h_t · Σ_k W_k, so F needs one H-vector.
    ``loss``: the output layer runs only on the positions that predict a response token
    (K rows instead of B·T); per-sample means by scatter-add. Both equal :func:`_objective`.
    """
    m = rm.to(torch.float32)
    if objective == "logit_sum":
        w = head.weight.detach().to(torch.float32).sum(dim=0)  # [H]
        per_pos = h.to(torch.float32) @ w.to(h.device)  # [B, T]
        return (per_pos * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    if objective == "loss":
        keep = rm[:, 1:].bool()  # position t predicts token t+1
        rows = torch.nonzero(keep, as_tuple=True)[0]  # [K] sample index of each kept position
        logits = head(h[:, :-1][keep]).to(torch.float32)  # [K, V]
        ce = F.cross_entropy(logits, ids[:, 1:][keep], reduction="none")  # [K]
        tot = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device).index_add(0, rows, ce)
        return tot / m[:, 1:].sum(-1).clamp_min(1.0)
    raise ValueError(f"unknown objective {objective!r} (expected 'logit_sum' or 'loss')")


def _grads_hooks(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    params: Mapping[str, Tensor],
    names: list[str],
    objective: Objective,
) -> Tensor:
    """One batched forward/backward + per-layer outer products → [B, P]."""
    mods = _linear_modules(model, names)
    b = int(input_ids.shape[0])
    out = torch.zeros(b, flat_dim(params), dtype=torch.float32, device=input_ids.device)
    live = attention_mask.bool().any(dim=1)  # all-padding rows: F = 0, zero gradient
    if not bool(live.any()):
        return out
    ids, am, rm = _right_pad(input_ids[live], attention_mask[live], response_mask[live],
                             attention_mask=attention_mask[live])
    rm = rm * am.to(rm.dtype)
    saved: dict[int, list[Tensor]] = {}

    def fwd(mod: nn.Module, inp: tuple[Tensor, ...], res: Tensor) -> None:
        if id(mod) in saved:
            raise RuntimeError("method='hooks': a differentiated nn.Linear ran twice in one "
                               "forward (weight sharing); use method='vmap'")
        saved[id(mod)] = [inp[0].detach()]
        res.register_hook(lambda g, k=id(mod): saved[k].append(g.detach()))

    # the layer outputs must carry gradients even when the weights are not leaves of interest
    leaves = [params[n] for n in names]
    req = [p.requires_grad for p in leaves]
    handles = [m.register_forward_hook(fwd) for m in mods]
    try:
        for p in leaves:
            p.requires_grad_(True)
        with torch.enable_grad():
            short = _decoder_and_head(model, names)
            if short is not None:
                decoder, head = short
                h = decoder(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
                value = _objective_via_hidden(objective, h, head, ids, rm)
            else:
                logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
                value = _objective(objective, logits, ids, rm)
            # the summed gradient itself is not used: the output hooks capture δ per sample
            torch.autograd.grad(value.sum(), leaves, allow_unused=True)
    finally:
        for hd in handles:
            hd.remove()
        for p, r in zip(leaves, req, strict=True):
            p.requires_grad_(r)
    cols, col = [], 0
    for n, mod in zip(names, mods, strict=True):
        if id(mod) not in saved:
            raise RuntimeError(f"method='hooks': the layer of {n!r} did not run in the forward "
                               "(merged or disabled adapter?)")
        x, *gs = saved[id(mod)]
        numel = int(params[n].numel())
        if gs:  # no output gradient: the layer does not reach F (zero, like allow_unused)
            g = torch.einsum("bto,bti->boi", gs[0].to(torch.float32), x.to(torch.float32))
            cols.append((col, g.reshape(g.shape[0], -1)))
        col += numel
    rows = torch.zeros(int(live.sum()), flat_dim(params), dtype=torch.float32,
                       device=input_ids.device)
    for c, g in cols:
        rows[:, c : c + g.shape[1]] = g
    out[live] = rows
    return out


def _grads_vmap(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    params: Mapping[str, Tensor],
    names: list[str],
    objective: Objective,
    chunk_size: int | None,
) -> Tensor:
    """``vmap(grad(F))`` over the batch → [B, P]."""
    fn = _single_objective_fn(model, objective, _compute_dtype(model))
    detached = {n: params[n].detach() for n in names}
    per_sample = vmap(grad(fn), in_dims=(None, 0, 0, 0), chunk_size=chunk_size)
    grads = per_sample(detached, input_ids, attention_mask, response_mask)
    return _flatten(grads, names, int(input_ids.shape[0]))


def _grads_loop(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    params: Mapping[str, Tensor],
    names: list[str],
    objective: Objective,
) -> Tensor:
    """One forward/backward per unpadded sample → [B, P]."""
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    rows: list[Tensor] = []
    with torch.enable_grad():
        for i in range(int(input_ids.shape[0])):
            keep = attention_mask[i].bool()
            if not bool(keep.any()):  # an all-padding row: F = 0, zero gradient (as with vmap)
                rows.append(torch.zeros(flat_dim(leaves), device=leaves[names[0]].device))
                continue
            ids = input_ids[i, keep][None]  # [1, L]
            rm = response_mask[i, keep][None]
            out = functional_call(
                model, leaves, args=(), kwargs={"input_ids": ids, "use_cache": False}, strict=False
            )
            value = _objective(objective, out.logits, ids, rm)[0]
            gs = torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True)
            flat = [
                (torch.zeros_like(leaves[n]) if g is None else g).reshape(-1).to(torch.float32)
                for n, g in zip(names, gs, strict=True)
            ]
            rows.append(torch.cat(flat))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# Rademacher projection
# ---------------------------------------------------------------------------------------------


def _block_seed(seed: int, block: int) -> int:
    """A 63-bit generator seed derived from (seed, block index), identical in every process."""
    digest = hashlib.blake2b(f"rademacher:{seed}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class RademacherProjector:
    """Π: R^in_dim → R^out_dim with i.i.d. entries ±1/√out_dim, never materialised whole.

    Definition (independent of ``chunk_rows`` and of the device): the rows of Π^T (one per input
    coordinate) are grouped in blocks of ``block_rows``. Block b is drawn from a CPU
    ``torch.Generator`` (mt19937) seeded with ``blake2b(seed, b)``: ``block_rows × W`` uniform
    64-bit words (W = ⌈out_dim/64⌉), row-major; row r's bytes, little-endian, give its signs
    bit by bit (bit i of byte j → column 8j + i; bit 1 → +1/√out_dim, 0 → -1/√out_dim). So the same
    seed gives the same Π in any process and on any device (the bits are always drawn on the CPU,
    only 1/32 of the matrix's fp32 size, then expanded on the target device).

    ``project`` streams over chunks of ``chunk_rows`` input coordinates (a multiple of
    ``block_rows``): it expands one chunk [chunk_rows, out_dim] and accumulates
    ``out += g[:, chunk] @ chunk``. Memory: at most ``chunk_rows × 64·⌈out_dim/64⌉`` floats for
    the chunk (= chunk_rows × out_dim when out_dim is a multiple of 64), plus the packed bits
    (1/32 of that) and their int32 indices (1/8 of that) — e.g. 1024 × 8192 fp32 = 32 MiB.
    Cost per ``project`` call: in_dim × out_dim sign expansions (independent of the batch size)
    plus B × in_dim × out_dim multiply-adds, so project many samples per call.

    Args:
        in_dim: P, the gradient length.
        out_dim: p, the projected length (default 8192, the paper's).
        seed: the projection's seed (part of the selection's identity).
        chunk_rows: input coordinates expanded at once (memory/speed knob; a multiple of
            ``block_rows``; does not change Π).
        block_rows: input coordinates per seeded generator (part of Π's definition).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        *,
        seed: int,
        chunk_rows: int = 1024,
        block_rows: int = 256,
    ) -> None:
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError("in_dim and out_dim must be positive")
        if block_rows <= 0 or chunk_rows <= 0 or chunk_rows % block_rows:
            raise ValueError(
                f"chunk_rows ({chunk_rows}) must be a positive multiple of block_rows ({block_rows})"
            )
        if sys.byteorder != "little":  # the byte view of the random words assumes little-endian
            raise RuntimeError("RademacherProjector needs a little-endian host")
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.seed = int(seed)
        self.chunk_rows = int(chunk_rows)
        self.block_rows = int(block_rows)
        self.words_per_row = math.ceil(self.out_dim / 64)
        self._tables: dict[tuple[str, torch.dtype], Tensor] = {}

    @property
    def padded_out_dim(self) -> int:
        """64·⌈out_dim/64⌉, the width of an expanded chunk before slicing to out_dim."""
        return 64 * self.words_per_row

    @property
    def max_chunk_floats(self) -> int:
        """Upper bound on the elements of the expanded chunk buffer."""
        return self.chunk_rows * self.padded_out_dim

    def describe(self) -> dict[str, int | str]:
        """Everything that defines Π (store it next to projected gradients)."""
        return {
            "kind": "rademacher-blake2b-mt19937-bits-v1",
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "seed": self.seed,
            "block_rows": self.block_rows,
        }

    def _table(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """[256, 8] byte → signs lookup (bit i of the byte → column i), scaled by 1/√out_dim."""
        key = (str(device), dtype)
        if key not in self._tables:
            bits = (torch.arange(256)[:, None] >> torch.arange(8)[None, :]) & 1
            signs = (bits.to(torch.float64) * 2 - 1) / math.sqrt(self.out_dim)
            self._tables[key] = signs.to(device=device, dtype=dtype)
        return self._tables[key]

    def _fill_words(self, words: Tensor, start: int, stop: int) -> None:
        """Draw the random words of input rows [start, stop) (block-aligned start) into words."""
        for row in range(start, stop, self.block_rows):
            block = row // self.block_rows
            end = min(row + self.block_rows, stop)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(_block_seed(self.seed, block))
            # A partial last block draws a prefix of the full block's stream (CPU RNG is serial).
            words[row - start : end - start].random_(-(2**63), None, generator=gen)

    def iter_chunks(
        self, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(start, stop, chunk)`` with chunk = Π^T[start:stop] of shape [stop-start,
        out_dim]. The chunk is a view of one reused buffer: consume it before the next step."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        table = self._table(dev, dtype)
        words = torch.empty(self.chunk_rows, self.words_per_row, dtype=torch.int64)
        buf = torch.empty(self.chunk_rows, self.padded_out_dim, dtype=dtype, device=dev)
        for start in range(0, self.in_dim, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.in_dim)
            rows = stop - start
            self._fill_words(words, start, stop)
            # move the packed bytes (1/32 of the chunk's fp32 size), widen on the target device
            idx = words[:rows].view(torch.uint8).reshape(-1).to(dev).to(torch.int32)
            torch.index_select(table, 0, idx, out=buf[:rows].view(-1, 8))
            yield start, stop, buf[:rows, : self.out_dim]

    def project(self, g: Tensor) -> Tensor:
        """Project gradients: [B, in_dim] → [B, out_dim] (or [in_dim] → [out_dim]), in fp32 on
        g's device, accumulated chunk by chunk."""
        squeeze = g.dim() == 1
        g2 = g[None] if squeeze else g
        if g2.dim() != 2 or g2.shape[1] != self.in_dim:
            raise ValueError(f"expected [B, {self.in_dim}], got {tuple(g.shape)}")
        g2 = g2.to(torch.float32)
        out = torch.zeros(g2.shape[0], self.out_dim, dtype=torch.float32, device=g2.device)
        for start, stop, chunk in self.iter_chunks(device=g2.device, dtype=torch.float32):
            out.addmm_(g2[:, start:stop], chunk)
        return out[0] if squeeze else out


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


class MeanAccumulator:
    """Streaming mean of gradient rows (ḡ_D over batches or shards), summed in fp64.

    ``update([B, p])`` adds rows; ``merge(other)`` combines shard accumulators; ``mean`` is [p].
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None  # [p] fp64
        self.count = 0

    def update(self, grads: Tensor) -> MeanAccumulator:
        """Add a batch [B, p] (or a single row [p])."""
        g = grads[None] if grads.dim() == 1 else grads
        s = g.to(torch.float64).sum(dim=0)
        self.total = s if self.total is None else self.total + s.to(self.total.device)
        self.count += int(g.shape[0])
        return self

    def merge(self, other: MeanAccumulator) -> MeanAccumulator:
        """Fold another accumulator (e.g. another shard's) into this one."""
        if other.total is not None:
            self.total = other.total.clone() if self.total is None else self.total + other.total
            self.count += other.count
        return self

    @property
    def mean(self) -> Tensor:
        """[p] fp32 mean of all rows seen."""
        if self.total is None or self.count == 0:
            raise ValueError("MeanAccumulator is empty")
        return (self.total / self.count).to(torch.float32)


def ntk_scores(
    domain_grads: Tensor, pool_grads: Tensor, *, kind: ScoreKind = "inner", eps: float = 1e-12
) -> Tensor:
    """NTK-Selector scores s_j = ⟨ḡ_D, g(c_j)⟩ (``inner``) or cos(ḡ_D, g(c_j)) (``cosine``).

    Args:
        domain_grads: [Nd, p] domain gradients (averaged here) or an already averaged ḡ_D [p]
            (e.g. :attr:`MeanAccumulator.mean`).
        pool_grads: [Nc, p] candidate gradients (same projection).
        kind: ``inner`` (default, the paper's) or ``cosine``.
        eps: floor on the norm product for ``cosine``.

    Returns:
        [Nc] fp32 scores (higher = more useful for the domain).
    """
    mean = domain_grads.to(torch.float32)
    if mean.dim() == 2:
        mean = mean.mean(dim=0)
    pool = pool_grads.to(torch.float32)
    if mean.dim() != 1 or pool.dim() != 2 or pool.shape[1] != mean.shape[0]:
        raise ValueError(f"shape mismatch: domain {tuple(domain_grads.shape)}, pool "
                         f"{tuple(pool_grads.shape)}")
    s = pool @ mean.to(pool.device)
    if kind == "inner":
        return s
    if kind == "cosine":
        return s / (pool.norm(dim=1) * mean.norm()).clamp_min(eps)
    raise ValueError(f"unknown kind {kind!r} (expected 'inner' or 'cosine')")


def top_n(scores: Tensor, n: int) -> Tensor:
    """Indices [min(n, N)] of the n highest scores [N], best first; ties → lower index first."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[: max(0, int(n))]


def adam_second_moments(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> Tensor:
    """Flatten an Adam/AdamW optimizer's ``exp_avg_sq`` over ``params`` → [P] fp32, in the same
    column order as :func:`per_sample_grads` (zeros for parameters without state)."""
    parts = []
    for p in params.values():
        v = optimizer.state.get(p, {}).get("exp_avg_sq")
        parts.append((torch.zeros_like(p) if v is None else v).reshape(-1).to(torch.float32))
    return torch.cat(parts)


def adam_precondition(grads: Tensor, *, exp_avg_sq: Tensor, eps: float = 1e-8) -> Tensor:
    """Adam-preconditioned gradients g / (√v + eps), per coordinate.

    Args:
        grads: [B, P] unprojected per-sample gradients (precondition before projecting).
        exp_avg_sq: [P] the optimizer's second-moment estimate v (:func:`adam_second_moments`).
        eps: Adam's epsilon.

    Returns:
        [B, P] fp32.
    """
    v = exp_avg_sq.to(device=grads.device, dtype=torch.float32)
    return grads.to(torch.float32) / (v.sqrt() + eps)


def less_scores(
    domain_grads: Tensor,
    pool_grads: Tensor,
    *,
    adam_state: Tensor | None = None,
    eps: float = 1e-8,
    reduce: Literal["max", "mean"] = "max",
) -> Tensor:
    """LESS scores: cosine of each (Adam-preconditioned) pool gradient to each domain gradient,
    reduced over the domain samples.

    LESS uses loss gradients (``per_sample_grads(..., objective="loss")``). Preconditioning is
    per parameter, so with projection it belongs before :meth:`RademacherProjector.project`
    (call :func:`adam_precondition` there); ``adam_state`` here is for unprojected gradients.
    (LESS's code also folds the sample into Adam's moments first; this uses v as given.)

    Args:
        domain_grads: [Nd, p] domain (target) gradients, plain.
        pool_grads: [Nc, p] candidate gradients.
        adam_state: optional [p] second moments v; pool gradients become g / (√v + eps).
        eps: Adam's epsilon (and the norm floor of the cosine).
        reduce: ``max`` (default) or ``mean`` over the domain samples.

    Returns:
        [Nc] fp32 scores.
    """
    pool = pool_grads.to(torch.float32)
    if adam_state is not None:
        pool = adam_precondition(pool, exp_avg_sq=adam_state, eps=eps)
    dom = domain_grads.to(device=pool.device, dtype=torch.float32)
    if dom.dim() == 1:
        dom = dom[None]
    cos = F.normalize(pool, dim=1, eps=eps) @ F.normalize(dom, dim=1, eps=eps).T  # [Nc, Nd]
    if reduce == "max":
        return cos.max(dim=1).values
    if reduce == "mean":
        return cos.mean(dim=1)
    raise ValueError(f"unknown reduce {reduce!r} (expected 'max' or 'mean')")
