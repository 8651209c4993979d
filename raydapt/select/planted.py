"""Planted pools: a general chain-of-thought pool with a known set of rows planted into it, so a
selector's precision / recall / ROC-AUC on those rows can be measured (benchmarks/ntk_needles.py).

Planted rows are formatted exactly like pool rows (``id``, ``source``, ``question``, ``rationale``,
``answer``): a multiple-choice item becomes a FLAN-AQuA-style row, its options listed in the
question (``Options:\\n(A) text``) and its answer ``(X)``. The reverse, :func:`pool_row_to_mc`,
turns such a FLAN-AQuA row into a multiple-choice task row (for an arithmetic-flavoured D).

    rows = sample_rows(read_qa(path)[0], n=100, seed=0, salt="planted")
    pool_rows = [mc_to_pool_row(r) for r in rows.to_dict("records")]
    info = write_planted_pool(out / "pool.jsonl", general=g, planted={"medical": pool_rows})

No model, no Ray: the construction is cheap and its id sets are checked by a unit test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from raydapt.data.readers import unit_hash

POOL_FIELDS = ["id", "source", "question", "rationale", "answer"]

_OPT = re.compile(r"^\(([A-J])\)\s*(.*)$")


def sample_rows(rows: pd.DataFrame, *, n: int, seed: int, salt: str) -> pd.DataFrame:
    """The ``n`` rows with the lowest seeded id hash (independent of row order)."""
    u = unit_hash(rows["id"], seed=seed, salt=salt)
    return rows.assign(_u=u).sort_values("_u").head(n).drop(columns="_u").reset_index(drop=True)


def mc_to_pool_row(row: dict[str, Any]) -> dict[str, str]:
    """A multiple-choice QA row (``options`` a mapping or its JSON) → a pool row like FLAN-AQuA's:
    question + ``\\nOptions:\\n(A) …`` lines, the row's rationale (may be empty), answer ``(X)``.
    A PubMedQA-style ``context`` goes before the question."""
    opts = row["options"]
    opts = json.loads(opts) if isinstance(opts, str) else dict(opts)
    ctx = str(row.get("context") or "").strip()
    q = (f"{ctx}\n\n" if ctx else "") + str(row["question"]).strip()
    q += "\nOptions:\n" + "\n".join(f"({k}) {str(v).strip()}" for k, v in opts.items())
    rat = row.get("rationale")
    rat = "" if rat is None or (isinstance(rat, float) and rat != rat) else str(rat).strip()
    return {"id": str(row["id"]), "source": str(row.get("source") or "planted"), "question": q,
            "rationale": rat, "answer": f"({row['answer']})"}


def pool_row_to_mc(row: dict[str, Any], *, split: str = "train") -> dict[str, Any] | None:
    """A FLAN-AQuA-style pool row (options ``(A) text`` after ``Options:``, answer ``(X)``) → a
    multiple-choice task row (``options`` mapping, answer letter); None if it has no such
    options or its answer is not one of them."""
    q = str(row["question"])
    head, sep, tail = q.partition("\nOptions:\n")
    if not sep:
        return None
    opts = {}
    for line in tail.split("\n"):
        m = _OPT.match(line.strip())
        if m:
            opts[m.group(1)] = m.group(2)
    ans = str(row["answer"]).strip().strip("()")
    if not opts or ans not in opts:
        return None
    return {"id": str(row["id"]), "source": str(row.get("source") or ""), "split": split,
            "question": head.strip(), "options": opts, "answer": ans,
            "rationale": str(row.get("rationale") or "")}


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


def write_planted_pool(path: str | Path, *, general: list[dict[str, Any]],
                       planted: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    """Write general + planted pool rows to one jsonl (pool fields only; ids must be unique).

    Returns:
        {"general": ids, <group>: ids for every planted group}.
    """
    rows = [{k: r.get(k, "") for k in POOL_FIELDS} for r in general]
    groups = {"general": [r["id"] for r in rows]}
    for name, prs in planted.items():
        rows += [{k: r.get(k, "") for k in POOL_FIELDS} for r in prs]
        groups[name] = [str(r["id"]) for r in prs]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("planted pool: duplicate ids")
    write_jsonl(path, rows)
    return groups


def roc_auc(scores, positive) -> float:
    """ROC-AUC of ``scores`` (higher = predicted positive) for the boolean ``positive``, ties
    counted half (Mann-Whitney U / (n_pos · n_neg)); NaN without both classes."""
    s = pd.Series(list(scores), dtype="float64")
    y = pd.Series(list(positive), dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = s.rank(method="average")
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall(selected_ids, positive_ids) -> tuple[float, float]:
    """Precision and recall of the planted ``positive_ids`` among ``selected_ids``."""
    sel, pos = set(selected_ids), set(positive_ids)
    hit = len(sel & pos)
    return (hit / len(sel) if sel else float("nan"), hit / len(pos) if pos else float("nan"))


# the setup of benchmarks/ntk_needles.py -------------------------------------------------------

#: planted medical rows come from files the medical D and its evaluation never read
PLANTED_MEDICAL_FILES = ("medical/medqa.jsonl", "medical/medbullets.jsonl",
                         "medical/medexqa.jsonl")


def build_needles_data(src: str | Path, out: str | Path, *, n_general: int = 1000,
                       n_planted: int = 100, n_arith_domain: int = 160, seed: int = 0
                       ) -> dict[str, Any]:
    """Write the planted-pool benchmark's data root ``out``.

    - ``out/medical`` → a link to ``src/medical`` (the medical D and evaluation: PubMedQA,
      MedMCQA, as in ``jobs/ntk_select/medical-smollm.cpu.yaml``);
    - ``out/planted/pool.jsonl``: ``n_general`` FLAN-CoT rows (every FLAN source but AQuA) +
      ``n_planted`` GSM8K train rows (group ``gsm8k``) + ``n_planted`` medical rows (group
      ``medical``: about a third each of MedQA, MedBullets, MedExQA, with the rationale where the
      file has one; as FLAN-AQuA-style pool rows, :func:`mc_to_pool_row`);
    - ``out/planted/aqua_domain.jsonl``: ``n_arith_domain`` FLAN-AQuA rows as multiple-choice
      task rows (``split: train``) — the arithmetic-flavoured D of the second setting (AQuA is
      kept out of the pool).

    Returns:
        {"root", "pool", "aqua_domain" (paths relative to root), "groups": {general, gsm8k,
        medical: ids}, "aqua_ids"}.
    """
    from raydapt.data.qa import read_qa

    src, out = Path(src), Path(out)
    (out / "planted").mkdir(parents=True, exist_ok=True)
    link = out / "medical"
    if not link.exists():
        link.symlink_to((src / "medical").resolve(), target_is_directory=True)
    flan, _ = read_qa(src / "cot_pool" / "flan_cot.jsonl")
    gsm, _ = read_qa(src / "cot_pool" / "gsm8k_train.jsonl")
    aqua = flan[flan["source"] == "flan/aqua"]
    general = sample_rows(flan[flan["source"] != "flan/aqua"], n=n_general, seed=seed,
                          salt="needles-general")
    g_rows = sample_rows(gsm, n=n_planted, seed=seed, salt="needles-gsm8k")
    med = []
    per = [n_planted // 3 + (1 if i < n_planted % 3 else 0) for i in range(3)]
    for f, k in zip(PLANTED_MEDICAL_FILES, per, strict=True):
        rows, _ = read_qa(src / f)
        rows = rows[rows["options"] != "{}"]
        med += [mc_to_pool_row(r) for r in
                sample_rows(rows, n=k, seed=seed, salt="needles-medical").to_dict("records")]
    groups = write_planted_pool(out / "planted" / "pool.jsonl",
                                general=general.to_dict("records"),
                                planted={"gsm8k": g_rows.to_dict("records"), "medical": med})
    dom = []
    for r in sample_rows(aqua, n=3 * n_arith_domain, seed=seed, salt="needles-aqua").to_dict(
            "records"):
        mc = pool_row_to_mc(r)
        if mc is not None:
            dom.append(mc)
        if len(dom) == n_arith_domain:
            break
    write_jsonl(out / "planted" / "aqua_domain.jsonl", dom)
    return {"root": str(out), "pool": "planted/pool.jsonl",
            "aqua_domain": "planted/aqua_domain.jsonl", "groups": groups,
            "aqua_ids": [d["id"] for d in dom]}
