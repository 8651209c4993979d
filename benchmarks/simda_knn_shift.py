"""SimDA's kNN half under domain shift (issue 29), from the cached teacher outputs.

    python benchmarks/simda_knn_shift.py rules [key=value ...]
    python benchmarks/simda_knn_shift.py prior [key=value ...]
    python benchmarks/simda_knn_shift.py students --what rules|prior [--seeds 0] [key=value ...]
    python benchmarks/simda_knn_shift.py shares [key=value ...]
    python benchmarks/simda_knn_shift.py ablation [key=value ...]

Every subcommand reads, per Amazon pair, the benchmark job's (jobs/simda/amazon-benchmark.cpu.yaml,
same split and seed as benchmarks/results/simda-cpu.json) teacher outputs through the recipe's own
read / teacher / store steps, so from the job's cache (``run.cache_dir=...`` as an override to
point at it; a missing teacher stage is computed, ~2-4 min a pair on 2 cores). Nothing here
trains on, or chooses by, a target-test label: they only score what was chosen.

- ``rules``: every label-free rule of ``annotate.select_on_target`` (and the source rule
  ``select_on_source``, and lam = 0) picks k / tau / lam on each pair; p_T's target-test
  accuracy against the calibrated zero-shot teacher's. No student: numpy only.
- ``prior``: imbalanced target-train splits (positive share 0.75 and 0.9, the unlabelled train
  rows subsampled, the test split untouched) of two pairs; zero-shot, p_T and the pseudo-labels
  under each calibration (the uniform fixed prior, the EM and BBSE estimates, the true prior as a
  reference a user could not know).
- ``students``: KL + sim students (the recipe's fit_student, its step budget and fields) on the
  p_T of ``rules`` (the --rule's choice) or ``prior`` (median vs EM estimate), --seeds.
- ``shares``: the finished ``prior`` students' predicted class shares on the test rows, and
  their accuracy with the logits shifted from their training prior to a uniform one (reloads
  their checkpoints; trains nothing).
- ``ablation``: the lam = 0 KL + sim students (``students --rule lam0 --seeds S``, or jobs run
  with ``annotate.lam=0 annotate.select_on_source=false distill.variants=[kl_sim]
  distill.seed=S``, run names ``<src>-to-<tgt>-lam0-sS`` under --runs) beside the seeded KL + sim
  students of simda-cpu.json, paired by seed.

Results go to benchmarks/results/simda-knn-shift-cpu.json (one key per subcommand).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from raydapt.config import load_job  # noqa: E402
from raydapt.recipes.simda import SimDARecipe, _p_llm  # noqa: E402
from raydapt.stages.annotate import (  # noqa: E402
    TARGET_RULES,
    calibrator,
    estimate_prior,
    knn_distribution,
    mix,
    select_on_source,
    select_on_target,
)

REPO = Path(__file__).resolve().parents[1]
PAIRS = ["books:kitchen", "dvd:electronics", "kitchen:books", "electronics:dvd"]
PRIOR_PAIRS = ["books:kitchen", "dvd:electronics"]
SHARES = [0.75, 0.9]
OUT = REPO / "benchmarks/results/simda-knn-shift-cpu.json"


class _Arrays(SimDARecipe):
    """The recipe's read / teacher / store steps only: the arrays the experiments need."""

    def run(self):
        self.read()
        self.teacher_pass()
        self.data_store()
        by = self.by_id

        def part(df):
            return {"ids": df["id"].to_numpy(), "text": df["text"].to_numpy(),
                    "y": df["y"].to_numpy(), "p_raw": _p_llm(by.loc[df["id"]]),
                    "keys": np.stack(by.loc[df["id"], "hidden"].to_numpy()).astype(np.float32)}
        return {"source": part(self.source), "train": part(self.tgt_train),
                "test": part(self.tgt_test)}


def _cfg(pair: str, overrides: list[str], job: str):
    s, t = pair.split(":")
    return load_job(job, [f"data.source.path={s}.jsonl", f"data.target.path={t}.jsonl",
                          f"run.name={s}-to-{t}-arrays", "tracking.enabled=false",
                          "distill.variants=[]", *overrides])


def ray_up(cfg, tries: int = 10) -> None:
    """Start (or join) Ray, retrying: on a loaded machine a local start can time out."""
    from raydapt.core.runtime import init_ray_for

    for i in range(tries):
        try:
            return init_ray_for(cfg.ray)
        except Exception as e:  # noqa: BLE001 - Ray's start error is a plain Exception
            if i == tries - 1:
                raise
            print(f"Ray did not start ({e}); retrying", flush=True)
            time.sleep(15)


def arrays(pair: str, overrides: list[str], job: str, cache: Path) -> dict:
    f = cache / f"{pair.replace(':', '-to-')}.pkl"
    if f.exists():
        return pickle.loads(f.read_bytes())
    cfg = _cfg(pair, overrides, job)
    ray_up(cfg)
    a = _Arrays.main(cfg)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(pickle.dumps(a))
    return a


def neighbours(a: dict, kmax: int, kind: str) -> dict:
    from raydapt.stages.teacher import loo_neighbours, store_neighbours

    ys = a["source"]["y"]
    d_s, i_s = loo_neighbours(a["source"]["keys"], kmax, kind=kind)
    d_tr, i_tr = store_neighbours(a["source"]["keys"], a["train"]["keys"], kmax, kind=kind)
    d_te, i_te = store_neighbours(a["source"]["keys"], a["test"]["keys"], kmax, kind=kind)
    return {"src": (d_s, ys[i_s]), "train": (d_tr, ys[i_tr]), "test": (d_te, ys[i_te])}


def p_t(nb: tuple, p_llm: np.ndarray, k: int, tau: float, lam: float, norm: str) -> np.ndarray:
    d, lab = nb
    return mix(knn_distribution(d[:, :k], lab[:, :k], p_llm.shape[1], tau=tau,
                                distance_norm=norm), p_llm, lam)


def _acc(y, p) -> float:
    return round(float((np.asarray(y) == np.asarray(p).argmax(1)).mean()), 4)


def choose(rule: str, a: dict, nb: dict, p_src, p_tr, cfg_a, tr_mask=None) -> tuple[dict, float]:
    """(k, tau, lam) by ``rule`` from source labels and unlabelled target-train rows; seconds."""
    t0 = time.time()
    m = slice(None) if tr_mask is None else tr_mask
    ys = a["source"]["y"]
    grid = dict(ks=cfg_a.k_grid, taus=cfg_a.tau_grid, lams=cfg_a.lam_grid,
                distance_norm=cfg_a.distance_norm)
    if rule == "source":
        best, _ = select_on_source(*nb["src"], p_src, ys, **grid)
    elif rule == "lam0":
        best = {"k": cfg_a.k, "tau": cfg_a.tau, "lam": 0.0}
    else:
        best, _ = select_on_target(*nb["src"], p_src, ys, nb["train"][0][m], nb["train"][1][m],
                                   p_tr, src_keys=a["source"]["keys"],
                                   tgt_keys=a["train"]["keys"][m], rule=rule, **grid)
    return {k: best[k] for k in ("k", "tau", "lam")}, round(time.time() - t0, 2)


def cmd_rules(args, cfg_of) -> dict:
    out: dict = {"rules": ["source", "lam0", *TARGET_RULES], "pairs": {}}
    hits: dict[str, dict[str, np.ndarray]] = {}  # per pair and rule: test row correct?
    for pair in args.pairs:
        cfg = cfg_of(pair)
        ca = cfg.annotate
        a = arrays(pair, args.overrides, args.job, args.arrays)
        nb = neighbours(a, max(ca.k_grid), ca.index)
        p_src = calibrator(ca.calibrate_llm, a["source"]["p_raw"], ca.calibrate_prior)(
            a["source"]["p_raw"])
        cal = calibrator(ca.calibrate_llm, a["train"]["p_raw"], ca.calibrate_prior)
        p_tr, p_te = cal(a["train"]["p_raw"]), cal(a["test"]["p_raw"])
        yte, ytr = a["test"]["y"], a["train"]["y"]
        row = {"zero_shot": _acc(yte, p_te), "zero_shot_pseudo": _acc(ytr, p_tr), "rules": {}}
        hits[pair] = {"zero_shot": yte == p_te.argmax(1)}
        for rule in out["rules"]:
            ch, sec = choose(rule, a, nb, p_src, p_tr, ca)
            hits[pair][rule] = yte == p_t(nb["test"], p_te, **ch, norm=ca.distance_norm).argmax(1)
            row["rules"][rule] = {
                **ch, "p_t": _acc(yte, p_t(nb["test"], p_te, **ch, norm=ca.distance_norm)),
                "pseudo": _acc(ytr, p_t(nb["train"], p_tr, **ch, norm=ca.distance_norm)),
                "seconds": sec}
            row["rules"][rule]["p_t_minus_zero_shot"] = round(
                row["rules"][rule]["p_t"] - row["zero_shot"], 4)
        out["pairs"][pair.replace(":", "->")] = row
        print(pair, json.dumps(row), flush=True)
    summary = {}
    for rule in out["rules"]:
        d = [r["rules"][rule]["p_t_minus_zero_shot"] for r in out["pairs"].values()]
        summary[rule] = {"pairs_p_t_ge_zero_shot": int(sum(x >= 0 for x in d)),
                         "mean_p_t_minus_zero_shot": round(float(np.mean(d)), 4),
                         "mean_p_t": round(float(np.mean(
                             [r["rules"][rule]["p_t"] for r in out["pairs"].values()])), 4),
                         "mean_p_t_minus_zero_shot_ci95": paired_bootstrap_ci(hits, rule)}
    out["summary"] = summary
    out["ci95"] = ("paired bootstrap over each pair's test rows (1,000 resamples, seed 0): the "
                   "95% interval of the mean over pairs of p_T - zero-shot accuracy, the "
                   "test-set noise of that difference")
    return out


def paired_bootstrap_ci(hits: dict, rule: str, reps: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of mean-over-pairs (rule accuracy - zero-shot accuracy), resampling each
    pair's test rows with replacement (both read-outs scored on the same resample)."""
    rng = np.random.default_rng(seed)
    diffs = np.zeros(reps)
    for h in hits.values():
        d = h[rule].astype(float) - h["zero_shot"].astype(float)
        idx = rng.integers(0, len(d), size=(reps, len(d)))
        diffs += d[idx].mean(1) / len(hits)
    return [round(float(x), 4) for x in np.percentile(diffs, [2.5, 97.5])]


def imbalanced_mask(y: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Keep every positive (class 1) row of the train split and a seeded subsample of the
    negatives so that positives are ``share`` of the rows."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_neg = int(round(len(pos) * (1 - share) / share))
    keep = np.r_[pos, np.random.default_rng(seed).choice(neg, n_neg, replace=False)]
    m = np.zeros(len(y), bool)
    m[keep] = True
    return m


CALS = {"median (fixed uniform prior)": ("median", None), "em estimate": ("prior", "em"),
        "bbse estimate": ("prior", "bbse"), "true prior (reference)": ("prior", "true"),
        "none (raw)": ("none", None)}


def prior_settings(a: dict, mask: np.ndarray, cal_kind: str, prior: str | None, share: float):
    """(calibrated p_tr, p_te, prior used) for one calibration of an imbalanced train split."""
    ptr_raw, pte_raw = a["train"]["p_raw"][mask], a["test"]["p_raw"]
    used = None
    if prior == "true":
        used = [1 - share, share]
    elif prior in ("em", "bbse"):
        used = [round(float(x), 4) for x in estimate_prior(
            a["source"]["p_raw"], a["source"]["y"], ptr_raw, method=prior)]
    cal = calibrator(cal_kind, ptr_raw, used)
    return cal(ptr_raw), cal(pte_raw), used


def cmd_prior(args, cfg_of) -> dict:
    out: dict = {"shares": SHARES, "calibrations": {k: list(v) for k, v in CALS.items()},
                 "pairs": {}}
    for pair in [p for p in PRIOR_PAIRS if p in args.pairs]:
        cfg = cfg_of(pair)
        ca = cfg.annotate
        a = arrays(pair, args.overrides, args.job, args.arrays)
        nb = neighbours(a, max(ca.k_grid), ca.index)
        p_src = calibrator(ca.calibrate_llm, a["source"]["p_raw"], ca.calibrate_prior)(
            a["source"]["p_raw"])
        ytr, yte = a["train"]["y"], a["test"]["y"]
        for share in SHARES:
            m = imbalanced_mask(ytr, share, cfg.run.seed)
            res = {"train_rows": int(m.sum()), "train_positive_share": round(
                float(ytr[m].mean()), 4), "test_positive_share": round(float(yte.mean()), 4),
                   "calibrations": {}}
            for name, (kind, prior) in CALS.items():
                ptr, pte, used = prior_settings(a, m, kind, prior, share)
                nbm = (nb["train"][0][m], nb["train"][1][m])
                r = {"prior_used": used, "zero_shot": _acc(yte, pte),
                     "zero_shot_pseudo": _acc(ytr[m], ptr),
                     "zero_shot_pseudo_positive_share": round(float(ptr.argmax(1).mean()), 4)}
                for rule in ("source", "agreement"):
                    ch, _ = choose(rule, a, nb, p_src, ptr, ca, tr_mask=m)
                    r[f"p_t[{rule}]"] = {**ch, "test": _acc(
                        yte, p_t(nb["test"], pte, **ch, norm=ca.distance_norm)),
                        "pseudo": _acc(ytr[m], p_t(nbm, ptr, **ch, norm=ca.distance_norm))}
                res["calibrations"][name] = r
            out["pairs"][f"{pair.replace(':', '->')}@{share}"] = res
            print(pair, share, json.dumps(res), flush=True)
    return out


def fit_kl_sim(cfg, a: dict, mask: np.ndarray, pt: np.ndarray, seed: int, name: str,
               storage: Path) -> float:
    """One KL + sim student on the recipe's fit_student, fields and step budget."""
    import ray

    from raydapt.recipes.simda import LOSS_KEYS, matched_steps, student_train_kw
    from raydapt.train.student import StudentTrain, fit_student

    d = cfg.distill
    kw = student_train_kw(d)
    kw["steps"] = kw["steps"] or matched_steps(int(mask.sum()), d.batch_size, d.num_workers,
                                               d.epochs)
    extra = {**d.model_dump(include=set(LOSS_KEYS)), "min_confidence": cfg.annotate.min_confidence}
    df = pd.DataFrame({"text": a["train"]["text"][mask], "p_t": list(pt),
                       "h_t": list(a["train"]["keys"][mask])})
    te = pd.DataFrame({"text": a["test"]["text"], "y": a["test"]["y"]})
    m = fit_student(name=name, objective="kl_sim", train_ds=ray.data.from_pandas(df),
                    eval_df=te, num_classes=pt.shape[1], student=d.student,
                    train=StudentTrain(**kw, **extra), seed=seed, storage=str(storage),
                    mlflow_uri=None, mlflow_run_id=None,
                    telemetry={"stage": "student-kl_sim", "method": "simda", "run": name})
    return round(float(m["accuracy"]), 4)


def _student_settings(args, cfg_of, start_ray: bool = True):
    """(pair's cfg, arrays, key, train mask, p_T, choice) of every student ``students --what``
    trains, in order."""
    for pair in [p for p in args.pairs if args.what == "rules" or p in PRIOR_PAIRS]:
        cfg = cfg_of(pair)
        if start_ray:
            ray_up(cfg)
        ca = cfg.annotate
        a = arrays(pair, args.overrides, args.job, args.arrays)
        nb = neighbours(a, max(ca.k_grid), ca.index)
        p_src = calibrator(ca.calibrate_llm, a["source"]["p_raw"], ca.calibrate_prior)(
            a["source"]["p_raw"])
        ytr = a["train"]["y"]
        if args.what == "rules":
            full = np.ones(len(ytr), bool)
            cal = calibrator(ca.calibrate_llm, a["train"]["p_raw"], ca.calibrate_prior)
            ptr = cal(a["train"]["p_raw"])
            ch, _ = choose(args.rule, a, nb, p_src, ptr, ca)
            yield (cfg, a, f"{pair.replace(':', '->')}[{args.rule}]", full,
                   p_t(nb["train"], ptr, **ch, norm=ca.distance_norm), ch)
            continue
        for share in args.shares:
            m = imbalanced_mask(ytr, share, cfg.run.seed)
            for cname in args.cals:
                kind, prior = CALS[cname]
                ptr, _, used = prior_settings(a, m, kind, prior, share)
                nbm = (nb["train"][0][m], nb["train"][1][m])
                ch, _ = choose("source", a, nb, p_src, ptr, ca, tr_mask=m)
                yield (cfg, a, f"{pair.replace(':', '->')}@{share}[{cname}]", m,
                       p_t(nbm, ptr, **ch, norm=ca.distance_norm), {**ch, "prior_used": used})


def _student_name(key: str, seed: int) -> str:
    return f"knnshift-{key}-s{seed}".replace("->", "-").replace("[", "-").replace(
        "]", "").replace(" ", "_").replace("(", "").replace(")", "").replace("@", "-")


def cmd_students(args, cfg_of, report: dict) -> dict:
    out = report.get(f"students_{args.what}", {})
    for cfg, a, key, m, pt, ch in _student_settings(args, cfg_of):
        ent = out.setdefault(key, {"choice": ch, "seeds": {}})
        for s in args.seeds:
            if str(s) in ent["seeds"]:
                continue
            ent["seeds"][str(s)] = fit_kl_sim(cfg, a, m, pt, s, _student_name(key, s),
                                              args.arrays / "train")
            print(key, s, ent["seeds"][str(s)], flush=True)
            report[f"students_{args.what}"] = out
            _write(args.out, report)
    return out


def _test_logits(cfg, state: dict, texts: np.ndarray, num_classes: int) -> np.ndarray:
    """The student of ``state`` (a fit's checkpoint) on ``texts``, as the student loop
    evaluates it (same truncation, window and pooling): logits [N, C]."""
    import torch

    from raydapt.core.assets import load_tokenizer
    from raydapt.recipes.simda import student_train_kw
    from raydapt.train.models import EncoderClassifier
    from raydapt.train.student import student_texts

    kw = student_train_kw(cfg.distill)
    model = EncoderClassifier(cfg.distill.student, num_classes, pooling="mean")
    model.load_state_dict(state["model"])
    model.eval()
    tok = load_tokenizer(cfg.distill.student)
    xs = student_texts(tok, list(texts), kw["max_length"], kw["text_truncation"])
    out = []
    with torch.inference_mode():
        for i in range(0, len(xs), 64):
            enc = tok(xs[i : i + 64], truncation=True, max_length=kw["max_length"],
                      padding=True, return_tensors="pt")
            out.append(model(enc["input_ids"], enc["attention_mask"])[0].float().numpy())
    return np.concatenate(out)


def cmd_shares(args, cfg_of, report: dict) -> dict:
    """The check of the skewed-labels reading of the imbalanced-target students: each finished
    ``students --what prior`` student's predicted class shares on the (balanced) test rows, and
    its accuracy once its logits are shifted from the prior it was trained on (the mean of its
    soft labels p_T) to a uniform one (prior-shift correction, Saerens et al. 2002). The
    uniform test prior is an assumption a user would have to make; the test labels only score.
    Trains nothing: the students' last checkpoints are reloaded, and each must reproduce the
    confusion matrix its fit recorded."""
    import torch

    from raydapt.evaluate import confusion_matrix

    done = report.get("students_prior", {})
    out: dict = {"deploy_prior_assumed": [0.5, 0.5], "students": {}}
    for cfg, a, key, _m, pt, _ch in _student_settings(args, cfg_of, start_ray=False):
        for s in sorted(done.get(key, {}).get("seeds", {}), key=int):
            d = args.arrays / "train" / _student_name(key, int(s))
            cks = sorted(p for p in d.glob("checkpoint_*") if (p / "state.pt").exists())
            if not cks or not (d / "final_metrics.json").exists():
                continue
            fin = json.loads((d / "final_metrics.json").read_text())
            state = torch.load(cks[-1] / "state.pt", weights_only=True, map_location="cpu")
            y = np.asarray(a["test"]["y"])
            lg = _test_logits(cfg, state, a["test"]["text"], pt.shape[1])
            pred = lg.argmax(1)
            cm = confusion_matrix(y, pred, pt.shape[1])
            if cm.tolist() != fin["confusion"]:
                raise RuntimeError(f"{key} seed {s}: the reloaded checkpoint gives {cm.tolist()}"
                                   f", its fit recorded {fin['confusion']}")
            prior_train = pt.mean(0)
            shifted = (lg + np.log(0.5) - np.log(prior_train)).argmax(1)
            out["students"][f"{key}/s{s}"] = {
                "accuracy": round(float((pred == y).mean()), 4),
                "test_true_positive_share": round(float(y.mean()), 3),
                "predicted_positive_share": round(float(pred.mean()), 3),
                "recall_per_class": [round(float(cm[c, c] / max(1, cm[c].sum())), 3)
                                     for c in range(cm.shape[0])],
                "train_soft_label_prior": [round(float(v), 3) for v in prior_train],
                "train_pseudo_label_positive_share": round(float((pt.argmax(1) == 1).mean()), 3),
                "prior_shifted_accuracy": round(float((shifted == y).mean()), 4),
                "prior_shifted_predicted_positive_share": round(float(shifted.mean()), 3),
                "checkpoint_epoch": int(state["epoch"])}
            print(key, s, json.dumps(out["students"][f"{key}/s{s}"]), flush=True)
    return out


def _ms(x: list[float]) -> dict:
    a = np.asarray(x, float)
    return {"mean": round(float(a.mean()), 4) if len(a) else None,
            "std": round(float(a.std(ddof=1)), 4) if len(a) > 1 else None, "n": len(a)}


def cmd_ablation(args, report: dict) -> dict:
    """lam = 0 KL + sim students beside the p_T KL + sim students of simda-cpu.json (same rows,
    step budget and seeds), per pair: the lam = 0 students come from ``students --rule lam0``
    (report['students_rules']['<pair>[lam0]']), else from job runs under --runs (run names
    ``<src>-to-<tgt>-lam0-sS``). Differences are paired by seed (same initialisation and
    batch order)."""
    main = json.loads((REPO / "benchmarks/results/simda-cpu.json").read_text())
    fits = report.get("students_rules", {})
    out: dict = {"pairs": {}, "paired_by": "student seed (distill.seed)"}
    diffs_all = []
    for pair in PAIRS:
        s, t = pair.split(":")
        key = f"{s}->{t}"
        e = main["pairs"][key]["student_seeds"]
        seeds, lam0, pt = [], [], []
        for i, seed in enumerate(args.seeds):
            v = fits.get(f"{key}[lam0]", {}).get("seeds", {}).get(str(seed))
            f = Path(args.runs) / f"{s}-to-{t}-lam0-s{seed}" / "results.json"
            if v is None and f.exists():
                v = round(json.loads(f.read_text())["accuracy"]["student:kl_sim"], 4)
            if v is not None and i < len(e["kl_sim"]["values"]):
                seeds.append(seed)
                lam0.append(v)
                pt.append(e["kl_sim"]["values"][i])
        d = [round(x - y, 4) for x, y in zip(pt, lam0)]
        diffs_all += d
        out["pairs"][key] = {
            "seeds": seeds, "kl_sim_lam0": lam0, "kl_sim_p_t": pt,
            "source_only": e["source_only"]["values"][: len(seeds)],
            "lam0": _ms(lam0), "p_t": _ms(pt), "p_t_minus_lam0": d,
            "p_t_minus_lam0_summary": _ms(d)}
    means = [v["p_t_minus_lam0_summary"]["mean"] for v in out["pairs"].values()
             if v["p_t_minus_lam0_summary"]["mean"] is not None]
    out["mean_over_pairs_p_t_minus_lam0"] = round(float(np.mean(means)), 4) if means else None
    out["all_paired_differences"] = _ms(diffs_all)
    return out


def cmd_tables(report: dict) -> str:
    """Markdown tables of the JSON (docs/simda.md's section is pasted from these)."""
    out = []
    r = report.get("rules")
    if r:
        pairs = list(r["pairs"])
        out.append("| rule | " + " | ".join(f"{p}: k / τ / λ → p_T" for p in pairs)
                   + " | pairs p_T ≥ zero-shot | mean p_T − zero-shot [95% CI] |")
        out.append("|---|" + "---:|" * (len(pairs) + 2))
        out.append("| calibrated zero-shot | " + " | ".join(
            f"{r['pairs'][p]['zero_shot']:.3f}" for p in pairs) + " | | |")
        for rule in r["rules"]:
            cells = []
            for p in pairs:
                x = r["pairs"][p]["rules"][rule]
                cells.append(f"{x['k']} / {x['tau']} / {x['lam']} → {x['p_t']:.3f}")
            sm = r["summary"][rule]
            out.append(f"| {rule} | " + " | ".join(cells)
                       + f" | {sm['pairs_p_t_ge_zero_shot']} of {len(pairs)} | "
                       f"{sm['mean_p_t_minus_zero_shot']:+.3f}"
                       + (" [{:+.3f}, {:+.3f}]".format(*sm["mean_p_t_minus_zero_shot_ci95"])
                          if "mean_p_t_minus_zero_shot_ci95" in sm else "") + " |")
        out.append("")
    pr = report.get("prior")
    if pr:
        out.append("| target-train (positive share) | calibration | prior used | zero-shot test "
                   "| pseudo-labels (zero-shot) | p_T test [source λ] | pseudo-labels [source λ] |")
        out.append("|---|---|---|---:|---:|---:|---:|")
        for key, e in pr["pairs"].items():
            for cname, c in e["calibrations"].items():
                used = "—" if c["prior_used"] is None else "/".join(
                    f"{x:.2f}" for x in c["prior_used"])
                ps = c["p_t[source]"]
                out.append(f"| {key} ({e['train_rows']} rows) | {cname} | {used} | "
                           f"{c['zero_shot']:.3f} | {c['zero_shot_pseudo']:.3f} | "
                           f"{ps['test']:.3f} (λ {ps['lam']}) | {ps['pseudo']:.3f} |")
        out.append("")
    ab = report.get("ablation")
    if ab and "all_paired_differences" in ab:
        def ms(m):
            if m["mean"] is None:
                return "—"
            return f"{m['mean']:.3f}" + (f" ± {m['std']:.3f}" if m["std"] is not None else "")
        out.append("| pair | seeds | KL + sim student, λ = 0 | KL + sim student, p_T | "
                   "p_T − λ = 0 (paired) | source-only |")
        out.append("|---|---|---:|---:|---:|---:|")
        for key, e in ab["pairs"].items():
            out.append(f"| {key} | {', '.join(map(str, e['seeds']))} | {ms(e['lam0'])} | "
                       f"{ms(e['p_t'])} | {ms(e['p_t_minus_lam0_summary'])} | "
                       f"{ms(_ms(e['source_only']))} |")
        out.append(f"| all pairs | | | | {ms(ab['all_paired_differences'])} (mean of pair "
                   f"means {ab['mean_over_pairs_p_t_minus_lam0']:+.3f}) | |")
        out.append("")
    for what in ("students_rules", "students_prior"):
        st = report.get(what)
        if st:
            out.append(f"| {what} setting | choice | KL + sim student, seeds |")
            out.append("|---|---|---|")
            for key, e in st.items():
                out.append(f"| {key} | {e['choice']} | " + " / ".join(
                    f"{v:.3f}" for v in e["seeds"].values()) + " |")
            out.append("")
    return "\n".join(out)


def _write(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what_to_run",
                    choices=["rules", "prior", "students", "shares", "ablation", "tables"])
    ap.add_argument("--job", default=str(REPO / "jobs/simda/amazon-benchmark.cpu.yaml"))
    ap.add_argument("--pairs", nargs="+", default=PAIRS)
    ap.add_argument("--arrays", type=Path, default=Path("runs/knn-shift"),
                    help="where the teacher arrays (a pickle per pair) and students go")
    ap.add_argument("--runs", default="runs", help="run.output_dir of the lam = 0 jobs")
    ap.add_argument("--what", choices=["rules", "prior"], default="rules")
    ap.add_argument("--rule", default="agreement")
    ap.add_argument("--cals", nargs="+", default=["median (fixed uniform prior)", "em estimate"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--shares", nargs="+", type=float, default=SHARES,
                    help="students / shares --what prior: the target-train positive shares")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    report = json.loads(args.out.read_text()) if args.out.exists() else {
        "benchmark": "simda-knn-shift-cpu"}
    # the machine of each subcommand's run (one file collects runs of several sessions);
    # "machine" stays the first run's
    here = describe()
    report.setdefault("machines", {})[args.what_to_run if args.what_to_run != "students"
                                      else f"students_{args.what}"] = here
    report.setdefault("machine", here)
    cmd = "python benchmarks/simda_knn_shift.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv)

    def cfg_of(pair):
        return _cfg(pair, args.overrides, args.job)

    w = args.what_to_run
    if w == "tables":
        print(cmd_tables(report))
        return report
    if w == "rules":
        report["rules"] = {"command": cmd, **cmd_rules(args, cfg_of)}
    elif w == "prior":
        report["prior"] = {"command": cmd, **cmd_prior(args, cfg_of)}
    elif w == "ablation":
        report["ablation"] = {"command": cmd, **cmd_ablation(args, report)}
    elif w == "shares":
        args.what = "prior"
        report["students_prior_shares"] = {"command": cmd, **cmd_shares(args, cfg_of, report)}
    else:
        report.setdefault("student_commands", {})[
            f"{args.what}:{args.rule}" if args.what == "rules" else args.what] = cmd
        cmd_students(args, cfg_of, report)
    _write(args.out, report)
    return report


if __name__ == "__main__":
    main()
