"""Planted pools: a general chain-of-thought pool with a known set of rows planted into it, so a
selector's precision / recall / ROC-AUC on those rows can be measured (benchmarks/ntk_needles.py).

Two pool builders:

- :func:`build_needles_data` (variant ``original``, the one the first results in
  benchmarks/results/ntk-needles-cpu.json used): planted medical rows become FLAN-AQuA-style rows
  (``Options:\\n(A) text``, answer ``(X)``) while AQuA itself is kept out of the pool, and MedQA /
  MedExQA rows keep their empty rationale. Their *format* gives them away: the ``(A)`` layout
  and the empty rationale occur in planted rows only (issue 26; :func:`format_features` and
  :func:`matching_stats` measure it).
- :func:`build_matched_needles_data` (variant ``matched``): every pool row, general or planted,
  is rendered by one of the same three templates (``letter``: ``Options:\\n(A) text`` and answer
  ``(X)``; ``text``: ``Options:\\n- text`` and the option text as answer; ``open``: no options,
  the option text as answer), and each planted row copies the template, the empty-or-not
  rationale, the question length and the rationale length of a seeded general "twin" row
  (trimming whole sentences, or picking the nearest-length source row). AQuA stays in the pool
  (as the arithmetic group, a decoy for the medical D), so layout, length and rationale presence
  say nothing about which group a row belongs to; :func:`matching_stats` gives a two-sample test
  per feature.

The reverse of the planted rows' rendering, :func:`pool_row_to_mc`, turns a FLAN-AQuA row into a
multiple-choice task row (for an arithmetic-flavoured D).

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

import numpy as np
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


# the format-matched variant --------------------------------------------------------------------

TEMPLATES = ("letter", "text", "open")
_SENT = re.compile(r"(?<=[.!?])\s+")
_DASH_LETTER = re.compile(r"^-\s*\(([A-J])\)\s*(.*)$")


def _words(s: str) -> int:
    return len(str(s).split())


def parse_pool_options(row: dict[str, Any]) -> tuple[str, dict[str, str] | None, str]:
    """A FLAN-CoT pool row → (question stem, options {letter: text} or None, answer letter, or
    the answer itself when there are no options). Reads the three FLAN layouts: ``(A) text``
    (AQuA), ``- (A) text`` (QASC) and ``- text`` with the option text as answer (ECQA, CREAK,
    Sensemaking); a row without ``Options:`` (StrategyQA, GSM8K) has no options."""
    q, ans = str(row["question"]), str(row["answer"]).strip()
    head, sep, tail = q.partition("\nOptions:\n")
    if not sep:
        return q.strip(), None, ans
    lines = [x.strip() for x in tail.split("\n") if x.strip()]
    opts: dict[str, str] = {}
    for i, line in enumerate(lines):
        m = _OPT.match(line) or _DASH_LETTER.match(line)
        if m:
            opts[m.group(1)] = m.group(2).strip()
        elif line.startswith("-"):
            opts["ABCDEFGHIJ"[i]] = line[1:].strip()
    letter = ans.strip("()")
    if letter not in opts:  # answer given as the option's text
        hit = [k for k, v in opts.items() if v == ans]
        if not hit:
            return q.strip(), None, ans
        letter = hit[0]
    return head.strip(), opts, letter


def render_template(stem: str, opts: dict[str, str] | None, answer: str, rationale: str,
                    template: str) -> tuple[str, str]:
    """(question, answer) of a pool row in one of :data:`TEMPLATES`; ``answer`` is the option
    letter when ``opts`` is given, else the answer text (then only ``open`` is possible)."""
    if opts is None:
        if template != "open":
            raise ValueError("a row without options can only take the open template")
        return stem, answer
    if template == "letter":
        return (stem + "\nOptions:\n" + "\n".join(f"({k}) {v}" for k, v in opts.items()),
                f"({answer})")
    if template == "text":
        return stem + "\nOptions:\n" + "\n".join(f"- {v}" for v in opts.values()), opts[answer]
    if template == "open":
        return stem, opts[answer]
    raise ValueError(f"unknown template {template!r}")


def _suffix_lengths(text: str) -> list[tuple[int, str]]:
    """(words, text) of every whole-sentence suffix of ``text``, shortest first."""
    sents = [x for x in _SENT.split(str(text).strip()) if x]
    return [(_words(" ".join(sents[i:])), " ".join(sents[i:])) for i in range(len(sents) - 1, -1, -1)]


def _prefix_lengths(text: str) -> list[tuple[int, str]]:
    sents = [x for x in _SENT.split(str(text).strip()) if x]
    return [(_words(" ".join(sents[:i])), " ".join(sents[:i])) for i in range(1, len(sents) + 1)]


def _cut_words(text: str, n: int) -> str:
    """The first whole sentences of ``text`` when they come within 10 % of ``n`` words, else its
    first ``n`` words closed with a full stop."""
    w, best = _closest(_prefix_lengths(text), n)
    if abs(w - n) <= 0.1 * n:
        return best
    return " ".join(str(text).split()[:max(n, 1)]).rstrip(",;:.") + "."


def _closest(options: list[tuple[int, str]], target: int) -> tuple[int, str]:
    return min(options, key=lambda t: (abs(t[0] - target), t[0]))


def _template_of(u: float, opts, source: str) -> str:
    if opts is None:
        return "open"
    return TEMPLATES[min(int(u * 3), 2)]


def build_matched_needles_data(src: str | Path, out: str | Path, *, n_general: int = 1000,
                               n_planted: int = 100, n_arith_domain: int = 160, seed: int = 0,
                               p_empty: float = 1 / 3) -> dict[str, Any]:
    """Write the format-matched planted-pool data root ``out`` (variant ``matched``).

    - ``out/medical`` → ``src/medical`` (the medical D and its evaluation, as before);
    - ``out/planted/pool.jsonl``: ``n_general`` FLAN-CoT rows (every FLAN source but AQuA, the
      same rows as :func:`build_needles_data`'s) + ``n_planted`` medical rows (group ``medical``:
      MedBullets where the twin has a rationale, MedQA / MedExQA where it has none) +
      ``n_planted`` FLAN-AQuA rows (group ``arith``; not D's). No GSM8K: its free-form numeric
      answers have no general counterpart.
    - General rows take a seeded template (``letter`` / ``text`` / ``open``; StrategyQA is
      ``open``, Sensemaking keeps its own ``text`` layout) and lose their rationale with probability ``p_empty``.
    - Each planted row copies a seeded general twin's template, rationale presence, question-stem
      length (a long medical vignette keeps its last whole sentences, nearest to the twin's
      length) and rationale length (MedBullets' explanation keeps its first whole sentences;
      AQuA rows are picked by nearest stem + rationale length, never cut).
    - ``out/planted/aqua_domain.jsonl``: the arithmetic D as in :func:`build_needles_data`.

    Returns:
        as :func:`build_needles_data`, groups {general, medical, arith}, plus ``templates``
        {id: template}.
    """
    from raydapt.data.qa import read_qa

    src, out = Path(src), Path(out)
    (out / "planted").mkdir(parents=True, exist_ok=True)
    link = out / "medical"
    if not link.exists():
        link.symlink_to((src / "medical").resolve(), target_is_directory=True)
    flan, _ = read_qa(src / "cot_pool" / "flan_cot.jsonl")
    aqua = flan[flan["source"] == "flan/aqua"]
    dom = []
    for r in sample_rows(aqua, n=3 * n_arith_domain, seed=seed, salt="needles-aqua").to_dict(
            "records"):
        mc = pool_row_to_mc(r)
        if mc is not None:
            dom.append(mc)
        if len(dom) == n_arith_domain:
            break
    write_jsonl(out / "planted" / "aqua_domain.jsonl", dom)
    dom_ids = {d["id"] for d in dom}

    general = sample_rows(flan[flan["source"] != "flan/aqua"], n=n_general, seed=seed,
                          salt="needles-general").to_dict("records")
    u_t = unit_hash([g["id"] for g in general], seed=seed, salt="matched-template")
    u_e = unit_hash([g["id"] for g in general], seed=seed, salt="matched-empty")
    g_rows, g_meta, templates = [], [], {}
    for g, ut, ue in zip(general, u_t, u_e, strict=True):
        stem, opts, ans = parse_pool_options(g)
        rat = "" if ue < p_empty else str(g["rationale"]).strip()
        if opts is None and "\nOptions:\n" in str(g["question"]):
            # Sensemaking: answer "Sentence A" names an option "Sentence A: ..."; kept as it is
            t, q, a = "text", str(g["question"]), str(g["answer"])
            stem = q.partition("\nOptions:\n")[0]
        else:
            t = _template_of(ut, opts, g["source"])
            q, a = render_template(stem, opts, ans, rat, t)
        g_rows.append({"id": g["id"], "source": g["source"], "question": q, "rationale": rat,
                       "answer": a})
        g_meta.append({"id": g["id"], "template": t, "empty": rat == "", "q": _words(q),
                       "resp": _words(rat) + _words(a)})
        templates[g["id"]] = t
    meta = pd.DataFrame(g_meta)

    def twins(salt: str) -> list[dict[str, Any]]:
        """n_planted general rows, stratified on (template, empty rationale) in the general
        rows' proportions (largest remainder), seeded within each cell."""
        cells = meta.groupby(["template", "empty"]).size()
        quota = cells / cells.sum() * n_planted
        take = np.floor(quota).astype(int)
        rest = n_planted - int(take.sum())
        take[(quota - take).sort_values(ascending=False, kind="stable").index[:rest]] += 1
        tw = [sample_rows(meta[(meta["template"] == t) & (meta["empty"] == e)], n=int(k),
                          seed=seed, salt=salt) for (t, e), k in take.items() if k]
        return sample_rows(pd.concat(tw), n=n_planted, seed=seed, salt=salt).to_dict("records")

    def rendered(stem, opts, ans, rat, t) -> tuple[str, str, int, int]:
        q, a = render_template(stem, opts, ans, rat, t)
        return q, a, _words(q), _words(rat) + _words(a)

    # medical: MedBullets (explanations) for twins with a rationale, MedQA / MedExQA without;
    # the stem keeps the whole-sentence suffix that brings the rendered question nearest the
    # twin's length, the explanation is cut to bring the response nearest the twin's
    med_src = {}
    for f in PLANTED_MEDICAL_FILES:
        rows, _ = read_qa(src / f)
        rows = rows[rows["options"] != "{}"]
        med_src[f] = sample_rows(rows, n=len(rows), seed=seed, salt="needles-medical").to_dict(
            "records")
    with_rat = [r for r in med_src["medical/medbullets.jsonl"] if str(r["rationale"]).strip()]
    no_rat = [r for f in ("medical/medqa.jsonl", "medical/medexqa.jsonl") for r in med_src[f]]
    for lst in (with_rat, no_rat):
        for r in lst:
            r["_suf"] = _suffix_lengths(r["question"])
            r["_opts"] = json.loads(r["options"])
    used: set[str] = set()
    m_rows = []
    for tw in twins("twin-medical"):
        t = tw["template"]

        def q_len(r, t=t, target=tw["q"]) -> tuple[int, str]:
            extra = _words(render_template("", r["_opts"], r["answer"], "", t)[0])
            return _closest([(w + extra, x) for w, x in r["_suf"]], target)

        def cost(r, tw=tw, t=t) -> float:
            c = abs(q_len(r)[0] - tw["q"]) / (tw["q"] + 5)
            if tw["empty"]:  # the response is the answer alone: match its length too
                aw = _words(render_template("", r["_opts"], r["answer"], "", t)[1])
                c += abs(aw - tw["resp"]) / (tw["resp"] + 5)
            return c

        cands = no_rat if tw["empty"] else with_rat
        best = min((r for r in cands if r["id"] not in used), key=cost)
        used.add(best["id"])
        stem = q_len(best)[1]
        ans_w = _words(render_template(stem, best["_opts"], best["answer"], "", t)[1])
        rat = "" if tw["empty"] else _cut_words(best["rationale"], max(tw["resp"] - ans_w, 1))
        q, a = render_template(stem, best["_opts"], best["answer"], rat, t)
        m_rows.append({"id": str(best["id"]), "source": str(best["source"]), "question": q,
                       "rationale": rat, "answer": a})
        templates[str(best["id"])] = t

    # arith: FLAN-AQuA rows (not D's), the one whose rendered question and response come
    # nearest the twin's (never cut)
    a_cands = []
    for r in aqua.to_dict("records"):
        if r["id"] in dom_ids:
            continue
        stem, opts, ans = parse_pool_options(r)
        if opts is None:
            continue
        a_cands.append({**r, "_stem": stem, "_opts": opts, "_ans": ans})
    a_cands.sort(key=lambda r: r["id"])
    order = np.argsort(unit_hash([r["id"] for r in a_cands], seed=seed, salt="needles-arith"),
                       kind="stable")
    a_cands = [a_cands[i] for i in order]
    a_rows = []
    for tw in twins("twin-arith"):
        t = tw["template"]

        def cost(r, tw=tw, t=t) -> float:
            rat = "" if tw["empty"] else str(r["rationale"]).strip()
            _, _, qw, rw = rendered(r["_stem"], r["_opts"], r["_ans"], rat, t)
            return abs(qw - tw["q"]) / (tw["q"] + 5) + abs(rw - tw["resp"]) / (tw["resp"] + 5)

        best = min((r for r in a_cands if r["id"] not in used), key=cost)
        used.add(best["id"])
        rat = "" if tw["empty"] else str(best["rationale"]).strip()
        q, a = render_template(best["_stem"], best["_opts"], best["_ans"], rat, t)
        a_rows.append({"id": str(best["id"]), "source": str(best["source"]), "question": q,
                       "rationale": rat, "answer": a})
        templates[str(best["id"])] = t
    groups = write_planted_pool(out / "planted" / "pool.jsonl", general=g_rows,
                                planted={"medical": m_rows, "arith": a_rows})
    return {"root": str(out), "pool": "planted/pool.jsonl",
            "aqua_domain": "planted/aqua_domain.jsonl", "groups": groups,
            "aqua_ids": [d["id"] for d in dom], "templates": templates, "variant": "matched"}


# format features and their two-sample tests --------------------------------------------------

_LAYOUT_OPT = (("paren", re.compile(r"\nOptions:\n\([A-J]\)")),
               ("dash-paren", re.compile(r"\nOptions:\n- \([A-J]\)")),
               ("dash", re.compile(r"\nOptions:\n- ")))


def layout_of(question: str, answer: str) -> str:
    """``<options style>/<answer style>``: options ``paren`` ``(A) x``, ``dash-paren``
    ``- (A) x``, ``dash`` ``- x`` or ``none``; answer ``letter`` (``(X)``) or ``text``."""
    opt = next((n for n, rx in _LAYOUT_OPT if rx.search(question)), "none")
    ans = "letter" if re.fullmatch(r"\([A-J]\)", str(answer).strip()) else "text"
    return f"{opt}/{ans}"


def format_features(rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Surface features of pool rows (as written to the pool file): ``q_words`` (question with
    its options), ``resp_words`` (the rendered response: rationale + ``The answer is X.``),
    ``empty_rationale``, ``layout`` (:func:`layout_of`)."""
    df = pd.DataFrame(rows)
    rat = df["rationale"].fillna("").astype(str).str.strip()
    return pd.DataFrame({
        "id": df["id"].astype(str),
        "q_words": df["question"].astype(str).map(_words),
        "resp_words": rat.map(_words) + df["answer"].astype(str).map(_words) + 3,
        "empty_rationale": rat.eq(""),
        "layout": [layout_of(q, a) for q, a in zip(df["question"], df["answer"], strict=True)]})


def matching_stats(features: pd.DataFrame, positive_ids) -> dict[str, dict[str, Any]]:
    """Two-sample tests, planted (``positive_ids``) against every other row, per feature:
    Kolmogorov-Smirnov for ``q_words`` and ``resp_words``, chi-square (contingency table) for
    ``empty_rationale`` and ``layout``. Each: statistic, p-value, and the two groups' summary."""
    from scipy.stats import chi2_contingency, ks_2samp

    pos = features["id"].isin(set(map(str, positive_ids))).to_numpy()
    out: dict[str, dict[str, Any]] = {}
    for f in ("q_words", "resp_words"):
        a, b = features.loc[pos, f].to_numpy(), features.loc[~pos, f].to_numpy()
        r = ks_2samp(a, b)
        out[f] = {"test": "ks", "statistic": float(r.statistic), "pvalue": float(r.pvalue),
                  "planted_median": float(np.median(a)), "general_median": float(np.median(b))}
    for f in ("empty_rationale", "layout"):
        tab = pd.crosstab(features[f], pos.astype(int))  # int columns: a bool list is a mask
        if tab.shape[0] < 2 or tab.shape[1] < 2:
            stat, p = 0.0, 1.0
        else:
            stat, p, _, _ = chi2_contingency(tab.to_numpy(), correction=False)
        col = features[f].astype(str)
        out[f] = {"test": "chi2", "statistic": float(stat), "pvalue": float(p),
                  "planted_share": col[pos].value_counts(normalize=True).round(3).to_dict(),
                  "general_share": col[~pos].value_counts(normalize=True).round(3).to_dict()}
    return out


def format_only_auc(features: pd.DataFrame, positive_ids, *, seed: int = 0) -> float:
    """Cross-validated (5-fold) ROC-AUC of a logistic regression that tells planted from
    general rows by the four format features alone (log lengths, empty rationale, layout
    one-hot): 0.5 = format gives nothing away."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = features["id"].isin(set(map(str, positive_ids))).to_numpy()
    x = pd.concat([np.log1p(features[["q_words", "resp_words"]]),
                   features["empty_rationale"].astype(float),
                   pd.get_dummies(features["layout"], dtype=float)], axis=1).to_numpy()
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    p = cross_val_predict(LogisticRegression(max_iter=1000), x, y, cv=cv,
                          method="predict_proba")[:, 1]
    return roc_auc(p, y)
