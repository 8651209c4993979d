"""Token-budget truncation of a text, shared by the teacher's prompts and the students' inputs."""

from __future__ import annotations

from typing import Any

TRUNCATION_SIDES = ("head", "tail", "head_tail")


def truncate_text(tok: Any, text: str, max_tokens: int, side: str = "head") -> str:
    """``text`` cut to at most ~``max_tokens`` tokens of ``tok`` (no special tokens): ``head``
    keeps its start, ``tail`` its end, ``head_tail`` the first and last halves joined by " ... "
    (reviews often give the verdict at the end). A text within the budget is returned as is."""
    if side not in TRUNCATION_SIDES:
        raise ValueError(f"unknown truncation side {side!r} ({', '.join(TRUNCATION_SIDES)})")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    if side == "head":
        return tok.decode(ids[:max_tokens])
    if side == "tail":
        return tok.decode(ids[-max_tokens:])
    h = max_tokens // 2
    return (tok.decode(ids[:h]).rstrip() + " ... "
            + tok.decode(ids[len(ids) - (max_tokens - h):]).lstrip())
