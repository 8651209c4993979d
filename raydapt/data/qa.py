"""QA samples (question, optional options, rationale, answer) for NTK-Selector.

A sample becomes a chat-formatted *prompt* (the user turn, with the options listed) and a
*response* (the assistant turn: rationale, then ``The answer is X.``). Training loss and the NTK
objective sum over response tokens only, given by a response mask::

    rows = read_qa(path)                                  # (DataFrame, rejects DataFrame)
    fmt = QAFormat()                                      # templates (config)
    prompt, response = render(row, fmt)                   # plain strings
    enc = encode_pair(tok, prompt, response, max_length=192, chat=True)
    enc["input_ids"] [L], enc["response_mask"] [L] (1 on response tokens), L ≤ max_length

Accepted shapes (jsonl / parquet / csv): ``id``, ``question``, ``answer`` required; ``options``
(a mapping letter → text, or a list, rendered ``A. text``), ``rationale``, ``context`` (PubMedQA:
put before the question) optional. A row with a missing id, an empty question or answer, options
that are not a mapping/list, or an answer letter outside its options goes to the rejects with its
reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydapt.data.readers import (
    REJECT_COLUMNS,
    DataError,
    NoUsableRows,
    check_not_empty,
    detect_format,
    read_csv_table,
)

QA_COLUMNS = ["id", "source", "split", "question", "context", "options", "rationale", "answer"]


@dataclass(frozen=True)
class QAFormat:
    """Templates that turn a QA row into prompt and response text.

    ``prompt``: ``{context}`` (with a blank line, or empty), ``{question}``, ``{options}`` (one
    ``X. text`` line each, or empty). ``response``: ``{rationale}`` (with a newline, or empty)
    and ``{answer}``. ``answer_prefix`` is the start of the response that multiple-choice
    evaluation puts after the prompt (the option letter is the next token), so it must be the
    text that directly precedes ``{answer}`` in ``response``.
    """

    prompt: str = "{context}{question}{options}"
    response: str = "{rationale}The answer is {answer}."
    answer_prefix: str = "The answer is"
    context_max_chars: int = 1200
    rationale_max_chars: int = 600


def _clean(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v).strip()


def _options(v: Any) -> dict[str, str] | None:
    """Options as an ordered {letter: text}; None if absent; ValueError if malformed."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, str):
        v = v.strip()
        if not v:
            return None
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise ValueError("options is a string that is not JSON") from None
    if isinstance(v, dict):
        return {str(k).strip(): _clean(t) for k, t in v.items() if t is not None}
    if isinstance(v, (list, tuple, np.ndarray)):
        return {chr(ord("A") + i): _clean(t) for i, t in enumerate(v)}
    raise ValueError(f"options must be a mapping or a list, got {type(v).__name__}")


def normalise_qa(records: list[dict[str, Any]], *, file: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw records → (rows with :data:`QA_COLUMNS`, rejects with file/id/reason/raw).

    ``options`` comes out as a JSON string (``{}`` when absent) so the frame stays flat.
    """
    good, bad = [], []
    for rec in records:
        rid = rec.get("id") if isinstance(rec, dict) else None
        raw = json.dumps(rec, default=str)[:300] if isinstance(rec, dict) else str(rec)[:300]
        try:
            if not isinstance(rec, dict):
                raise ValueError("row is not a JSON object")
            if rid is None or _clean(rid) == "":
                raise ValueError("missing id")
            q, a = _clean(rec.get("question")), _clean(rec.get("answer"))
            if not q:
                raise ValueError("empty question")
            if not a:
                raise ValueError("empty answer")
            opts = _options(rec.get("options"))
            if opts is not None and not opts:
                raise ValueError("options is empty")
            if opts is not None and a not in opts:
                raise ValueError(f"answer {a!r} is not one of the options {sorted(opts)}")
            good.append({
                "id": _clean(rid), "source": _clean(rec.get("source")) or Path(file).stem,
                "split": _clean(rec.get("split")),
                "question": q, "context": _clean(rec.get("context")),
                "options": json.dumps(opts or {}), "rationale": _clean(rec.get("rationale")),
                "answer": a,
            })
        except ValueError as exc:
            bad.append({"file": file, "id": None if rid is None else str(rid),
                        "reason": str(exc), "raw": raw})
    rows = pd.DataFrame(good, columns=QA_COLUMNS)
    rej = pd.DataFrame(bad, columns=REJECT_COLUMNS)
    dup = rows["id"].duplicated(keep="first")
    if dup.any():
        rej = pd.concat([rej, pd.DataFrame({"file": file, "id": rows.loc[dup, "id"],
                                            "reason": "duplicate id", "raw": ""})],
                        ignore_index=True)
        rows = rows[~dup].reset_index(drop=True)
    return rows, rej


def read_qa(path: str | Path, *, fmt: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a QA file (jsonl / parquet / csv) → (rows, rejects). Invalid JSON lines are rejects;
    a file without ``id``/``question``/``answer`` columns fails at once naming its columns."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"QA file not found: {p}")
    check_not_empty(p)
    kind = detect_format(p, fmt)
    records: list[Any] = []
    bad: list[dict[str, Any]] = []
    if kind == "jsonl":
        # split on b"\n" only: str.splitlines would also split inside a JSON string at U+2028,
        # U+0085, ... (they occur in GSM8K and PubMedQA text)
        for n, raw in enumerate(p.read_bytes().split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                records.append(json.loads(line))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                bad.append({"file": str(p), "id": None, "reason": f"line {n}: invalid JSON ({exc})",
                            "raw": raw[:300].decode("utf-8", "replace")})
    else:
        df = pd.read_parquet(p) if kind == "parquet" else read_csv_table(p)
        records = df.to_dict("records")
    cols = set().union(*(r.keys() for r in records[:50] if isinstance(r, dict))) if records else set()
    missing = {"id", "question", "answer"} - cols
    if records and missing:
        raise DataError(f"{p}: missing column(s) {sorted(missing)}; the file has {sorted(cols)}")
    rows, rej = normalise_qa(records, file=str(p))
    rej = pd.concat([pd.DataFrame(bad, columns=rej.columns), rej], ignore_index=True)
    if rows.empty and len(rej):
        raise NoUsableRows(p, rej)
    return rows, rej


def render(row: dict[str, Any] | pd.Series, fmt: QAFormat) -> tuple[str, str]:
    """One QA row → (prompt text, response text), before the chat template."""
    opts = json.loads(row["options"]) if isinstance(row["options"], str) else (row["options"] or {})
    ctx = _clean(row.get("context"))[: fmt.context_max_chars]
    rat = _clean(row.get("rationale"))[: fmt.rationale_max_chars]
    prompt = fmt.prompt.format(
        context=f"{ctx}\n\n" if ctx else "", question=_clean(row["question"]),
        options="".join(f"\n{k}. {v}" for k, v in opts.items()))
    response = fmt.response.format(rationale=f"{rat}\n" if rat else "", answer=row["answer"])
    return prompt, response


def chat_prefix(tok: Any, prompt: str, *, chat: bool) -> str:
    """The text that precedes the response: the chat template's user turn plus the assistant
    header (``chat``), or the bare prompt and a newline."""
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    return prompt + "\n"


def encode_pair(tok: Any, prompt: str, response: str, *, max_length: int, chat: bool = True,
                min_response_tokens: int = 8) -> dict[str, list[int]]:
    """Tokenise prompt + response into one sequence with a response mask.

    The prompt is truncated from the left (keeping the question's end and the options) and the
    response from the right, so at least ``min(len(response), min_response_tokens)`` response
    tokens survive ``max_length``. An end-of-turn token (the tokenizer's EOS) closes the response.

    Returns:
        ``input_ids`` [L] and ``response_mask`` [L] (1 on response tokens, EOS included), L ≤
        max_length.
    """
    pre = chat_prefix(tok, prompt, chat=chat)
    p_ids = tok(pre, add_special_tokens=not chat)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        r_ids = r_ids + [tok.eos_token_id]
    keep_r = min(len(r_ids), max(min_response_tokens, max_length - len(p_ids)))
    r_ids = r_ids[:keep_r]
    room = max_length - len(r_ids)
    if room <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for the prompt")
    if len(p_ids) > room:
        p_ids = p_ids[len(p_ids) - room:]
    return {"input_ids": p_ids + r_ids, "response_mask": [0] * len(p_ids) + [1] * len(r_ids)}


def pad_batch(encs: list[dict[str, list[int]]], *, pad_id: int, side: str = "right"
              ) -> dict[str, Any]:
    """Pad encoded pairs → ``input_ids``, ``attention_mask``, ``response_mask`` [B, T] tensors."""
    import torch

    t = max(len(e["input_ids"]) for e in encs)
    ids = torch.full((len(encs), t), pad_id, dtype=torch.long)
    am = torch.zeros((len(encs), t), dtype=torch.long)
    rm = torch.zeros((len(encs), t), dtype=torch.long)
    for i, e in enumerate(encs):
        n = len(e["input_ids"])
        sl = slice(0, n) if side == "right" else slice(t - n, t)
        ids[i, sl] = torch.tensor(e["input_ids"])
        am[i, sl] = 1
        rm[i, sl] = torch.tensor(e["response_mask"])
    return {"input_ids": ids, "attention_mask": am, "response_mask": rm}


def encode_table(rows: pd.DataFrame, tok: Any, fmt: QAFormat, *, max_length: int, chat: bool,
                 keep: tuple[str, ...] = ("id",), reject_file: str = "encode"
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """QA rows → ``keep`` columns + ``input_ids`` [L] + ``response_mask`` [L] (prompt + gold
    response, :func:`encode_pair`), and reject records (file ``reject_file``) for rows that do
    not fit or lack a field."""
    out, bad = [], []
    for r in rows.to_dict("records"):
        try:
            e = encode_pair(tok, *render(r, fmt), max_length=max_length, chat=chat)
        except (ValueError, KeyError) as exc:
            bad.append({"file": reject_file, "id": r["id"], "reason": str(exc), "raw": ""})
            continue
        out.append({**{k: r[k] for k in keep}, "input_ids": e["input_ids"],
                    "response_mask": e["response_mask"]})
    return (pd.DataFrame(out, columns=[*keep, "input_ids", "response_mask"]),
            pd.DataFrame(bad, columns=REJECT_COLUMNS))


def mc_prompt_table(test: pd.DataFrame, tok: Any, fmt: QAFormat, *, chat: bool
                    ) -> pd.DataFrame:
    """Multiple-choice items → id, task, prompt (chat prefix + ``fmt.answer_prefix``, the
    option letter comes next), n_options, gold (index of the answer letter)."""
    out = []
    for r in test.to_dict("records"):
        prompt, _ = render(r, fmt)
        letters = list(json.loads(r["options"]))
        out.append({"id": r["id"], "task": r["task"],
                    "prompt": chat_prefix(tok, prompt, chat=chat) + fmt.answer_prefix,
                    "n_options": len(letters), "gold": letters.index(r["answer"])})
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------
# normalisers for the streaming reader (raydapt.data.readers.open_source)
# ---------------------------------------------------------------------------------------------


class QARows:
    """Normaliser of QA rows for :func:`~raydapt.data.readers.open_source`: each read block's
    records → (rows with :data:`QA_COLUMNS`, rejects) by :func:`normalise_qa`. A line that is
    not JSON is a reject ``invalid JSON (...)``, as in :func:`read_qa`. Duplicate ids are
    caught within a block only; the NTK recipe checks them across the whole pool."""

    columns = QA_COLUMNS
    defaults: dict[str, Any] = {}
    needed = frozenset({"id", "question", "answer"})

    def __call__(self, records: list[Any], file: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        bad = [{"file": file, "id": None, "reason": f"invalid JSON ({r[1]})",
                "raw": str(r[0])[:300]} for r in records if isinstance(r, tuple)]
        rows, rej = normalise_qa([r for r in records if not isinstance(r, tuple)], file=file)
        if bad:
            rej = pd.concat([pd.DataFrame(bad, columns=REJECT_COLUMNS), rej], ignore_index=True)
        return rows, rej

    def __repr__(self) -> str:  # part of the cache key: stable across runs
        return "QARows()"


class TokenRows:
    """Normaliser of pre-tokenised rows (``id``, ``input_ids`` [L], ``response_mask`` [L]), e.g.
    the NTK recipe's stage-2 candidates file. A row whose two sequences are missing, empty or
    of different lengths is a reject."""

    columns = ["id", "input_ids", "response_mask"]
    defaults: dict[str, Any] = {"input_ids": None, "response_mask": None}
    needed = frozenset(columns)

    def __call__(self, records: list[Any], file: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        good, bad = [], []
        for r in records:
            rid = r.get("id") if isinstance(r, dict) else None
            a = r.get("input_ids") if isinstance(r, dict) else None
            m = r.get("response_mask") if isinstance(r, dict) else None
            if rid is None or _clean(rid) == "":
                why = "missing id"
            elif a is None or m is None or len(a) == 0:
                why = "no input_ids / response_mask"
            elif len(a) != len(m):
                why = f"input_ids has {len(a)} tokens, response_mask {len(m)}"
            else:
                good.append({"id": str(rid), "input_ids": list(a), "response_mask": list(m)})
                continue
            bad.append({"file": file, "id": None if rid is None else str(rid), "reason": why,
                        "raw": ""})
        return (pd.DataFrame(good, columns=self.columns),
                pd.DataFrame(bad, columns=REJECT_COLUMNS))

    def __repr__(self) -> str:
        return "TokenRows()"
