"""Frontier analysis of a diversity evaluation: does ESamp buy diversity that temperature (or min-p) cannot?

Each baseline family ("vanilla": temperature sweep; "min_p": temperature sweep with a min-p filter) traces, per seed,
a curve of Vendi score against log perplexity (its points sorted by PPL, joined linearly).  The frontier at a given
PPL is the best (highest) Vendi of any family's curve there.  An ESamp point (PPL_e, Vendi_e) of the same seed is
reported by

  vendi_margin   Vendi_e - frontier(PPL_e): diversity gained at equal quality (> 0: ESamp beats the baselines)
  sim_margin     similarity_e - (lowest baseline similarity at PPL_e) (< 0: ESamp more diverse)
  ppl_ratio      PPL_e / (lowest baseline PPL reaching Vendi_e): quality cost at equal diversity (< 1: better)

A margin is undefined (None) when PPL_e lies outside the range the baselines cover.  Spread: mean, sample standard
deviation and the per-seed values over seeds, and a bootstrap over prompts (the same resampled prompt set for every
run of a seed, margins averaged over seeds; 5 / 95 % quantiles) which shows how much the margin depends on the
particular prompts.  Termination check: each ESamp point is compared with the baseline at the same temperature and
filter (mean generated tokens, share of samples ending on an end-of-sequence token).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["interp", "analyse", "render_markdown", "write_plots", "BASELINE_FAMILIES"]

BASELINE_FAMILIES = ("vanilla", "min_p")


def interp(points: Sequence[Tuple[float, float]], x: float) -> Optional[float]:
    """Piecewise-linear y(x) through points (sorted here by x); None outside [min x, max x] or with < 2 points."""
    pts = sorted((float(a), float(b)) for a, b in points if a == a and b == b)
    if len(pts) < 2 or not (pts[0][0] <= x <= pts[-1][0]):
        return None
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    return float(np.interp(x, xs, ys))


def _stats(vals: Sequence[Optional[float]]) -> Dict[str, Any]:
    v = [x for x in vals if x is not None and x == x]
    out: Dict[str, Any] = {"per_seed": [None if x is None or x != x else x for x in vals],
                           "mean": None, "std": None, "positive_seeds": None}
    if v:
        out["mean"] = sum(v) / len(v)
        out["std"] = float(np.std(v, ddof=1)) if len(v) > 1 else None
        out["positive_seeds"] = sum(1 for x in v if x > 0)
    out["defined_seeds"] = len(v)
    return out


def _margins(point: Dict[str, float], fam_points: Dict[str, List[Dict[str, float]]]) -> Dict[str, Optional[float]]:
    """Margins of one ESamp point against the baseline families of the same seed."""
    lp = math.log(point["ppl"])
    best_v, best_fam, best_s, best_lp = None, None, None, None
    for fam, pts in fam_points.items():
        v = interp([(math.log(q["ppl"]), q["vendi"]) for q in pts], lp)
        if v is not None and (best_v is None or v > best_v):
            best_v, best_fam = v, fam
        s = interp([(math.log(q["ppl"]), q["similarity"]) for q in pts], lp)
        if s is not None and (best_s is None or s < best_s):
            best_s = s
        y = interp([(q["vendi"], math.log(q["ppl"])) for q in pts], point["vendi"])
        if y is not None and (best_lp is None or y < best_lp):
            best_lp = y
    # degeneration at equal diversity: the lowest loop / tail-token rate any baseline family has at Vendi_e
    deg = {}
    for key in ("loop_rate", "tail_rate"):
        best = None
        if point.get(key) is not None and point.get(key) == point.get(key):
            for fam, pts in fam_points.items():
                y = interp([(q["vendi"], q[key]) for q in pts if q.get(key) is not None], point["vendi"])
                if y is not None and (best is None or y < best):
                    best = y
        deg[key.replace("_rate", "_excess")] = None if best is None else point[key] - best
    return {"vendi_margin": None if best_v is None else point["vendi"] - best_v,
            "frontier_vendi": best_v, "frontier_family": best_fam, **deg,
            "sim_margin": None if best_s is None else point["similarity"] - best_s,
            "ppl_ratio": None if best_lp is None else point["ppl"] / math.exp(best_lp)}


def _matching_baseline(m: Dict[str, Any], methods: Sequence[Dict[str, Any]]) -> Optional[str]:
    fam = "vanilla" if m["min_p"] == 0 else "min_p"
    for b in methods:
        if (b["family"] == fam and abs(b["temperature"] - m["temperature"]) < 1e-9
                and abs(b["min_p"] - m["min_p"]) < 1e-9 and b["top_p"] == m["top_p"] and b["top_k"] == m["top_k"]):
            return b["name"]
    return None


def _run_metrics(run: Dict[str, Any], idx: Optional[np.ndarray] = None) -> Dict[str, float]:
    if idx is None:
        return run["metrics"]
    pp = run["per_prompt"]
    nll = np.asarray(pp["nll"])[idx].sum()
    tok = np.asarray(pp["tokens"])[idx].sum()
    return {"vendi": float(np.nanmean(np.asarray(pp["vendi"], dtype=float)[idx])),
            "similarity": float(np.nanmean(np.asarray(pp["similarity"], dtype=float)[idx])),
            "ppl": float(math.exp(nll / tok)) if tok > 0 else float("nan")}


def analyse(results: Dict[str, Any], *, bootstrap: int = 1000, boot_seed: int = 0) -> Dict[str, Any]:
    """Frontier margins of every ESamp method (see the module docstring) from run_diversity's results dict."""
    methods = results["methods"]
    runs = results["runs"]
    seeds = [str(s) for s in results["settings"]["seeds"]]
    fams = {f: [m for m in methods if m["family"] == f] for f in BASELINE_FAMILIES}
    fams = {f: ms for f, ms in fams.items() if len(ms) >= 2}
    esamp = [m for m in methods if m["family"] == "esamp"]
    out: Dict[str, Any] = {"families": {f: [m["name"] for m in ms] for f, ms in fams.items()}, "points": {}}
    if not fams:
        out["note"] = "no baseline family with >= 2 settings: no frontier"
    P = len(results["settings"]["prompts"])
    rng = np.random.default_rng(boot_seed)
    boot_idx = rng.integers(0, P, size=(bootstrap, P)) if bootstrap > 0 and P > 1 else None

    for m in esamp:
        per_seed = []
        for s in seeds:
            if s not in runs.get(m["name"], {}):
                per_seed.append(None)
                continue
            fp = {f: [runs[b["name"]][s]["metrics"] for b in ms if s in runs.get(b["name"], {})]
                  for f, ms in fams.items()}
            per_seed.append(_margins(runs[m["name"]][s]["metrics"], fp))
        rec: Dict[str, Any] = {}
        for key in ("vendi_margin", "sim_margin", "ppl_ratio", "loop_excess", "tail_excess"):
            rec[key] = _stats([None if p is None else p.get(key) for p in per_seed])
        # a Vendi win counts only if the point does not degenerate more than the baselines at the same Vendi
        vm, le, te = rec["vendi_margin"]["mean"], rec["loop_excess"]["mean"], rec["tail_excess"]["mean"]
        rec["win"] = (None if vm is None else
                      bool(vm > 0 and (le is None or le <= 0) and (te is None or te <= 0)))
        rec["frontier_family"] = [None if p is None else p["frontier_family"] for p in per_seed]
        # bootstrap over prompts (margins averaged over the seeds where defined)
        if boot_idx is not None and fams:
            vals, sims = [], []
            for idx in boot_idx:
                vs, ss = [], []
                for s in seeds:
                    if s not in runs.get(m["name"], {}):
                        continue
                    fp = {f: [_run_metrics(runs[b["name"]][s], idx) for b in ms if s in runs.get(b["name"], {})]
                          for f, ms in fams.items()}
                    mg = _margins(_run_metrics(runs[m["name"]][s], idx), fp)
                    if mg["vendi_margin"] is not None:
                        vs.append(mg["vendi_margin"])
                    if mg["sim_margin"] is not None:
                        ss.append(mg["sim_margin"])
                if vs:
                    vals.append(sum(vs) / len(vs))
                if ss:
                    sims.append(sum(ss) / len(ss))
            rec["bootstrap"] = {
                "resamples": int(boot_idx.shape[0]), "defined": len(vals),
                "vendi_margin_q05": float(np.quantile(vals, 0.05)) if vals else None,
                "vendi_margin_q95": float(np.quantile(vals, 0.95)) if vals else None,
                "vendi_margin_p_le_0": float(np.mean(np.asarray(vals) <= 0)) if vals else None,
                "sim_margin_q05": float(np.quantile(sims, 0.05)) if sims else None,
                "sim_margin_q95": float(np.quantile(sims, 0.95)) if sims else None,
            }
        # termination check against the baseline at the same temperature and filter
        base = _matching_baseline(m, methods)
        rec["matched_baseline"] = base
        if base is not None:
            dl, de, bl, el, be, ee = [], [], [], [], [], []
            for s in seeds:
                if s in runs.get(base, {}) and s in runs.get(m["name"], {}):
                    a, b = runs[base][s]["metrics"], runs[m["name"]][s]["metrics"]
                    dl.append(b["mean_tokens"] - a["mean_tokens"])
                    de.append(b["eos_rate"] - a["eos_rate"])
                    bl.append(a["mean_tokens"])
                    el.append(b["mean_tokens"])
                    be.append(a["eos_rate"])
                    ee.append(b["eos_rate"])
            rec["length_delta"] = _stats(dl)
            rec["eos_rate_delta"] = _stats(de)
            rec["baseline_mean_tokens"] = _stats(bl)["mean"]
            rec["esamp_mean_tokens"] = _stats(el)["mean"]
            rec["baseline_eos_rate"] = _stats(be)["mean"]
            rec["esamp_eos_rate"] = _stats(ee)["mean"]
        out["points"][m["name"]] = rec
    return out


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------
def _agg(runs_m: Dict[str, Any], key: str) -> Tuple[Optional[float], Optional[float]]:
    v = [r["metrics"].get(key) for r in runs_m.values()]
    v = [x for x in v if x is not None and x == x]
    if not v:
        return None, None
    return sum(v) / len(v), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def _f(v: Optional[float], d: int, sign: bool = False) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{v:+.{d}f}" if sign else f"{v:.{d}f}"


def _pm(mean_std: Tuple[Optional[float], Optional[float]], d: int, sign: bool = False) -> str:
    m, s = mean_std
    return _f(m, d, sign) + ("" if s is None else f" ± {s:.{d}f}")


def _label(m: Dict[str, Any]) -> str:
    if m["family"] != "esamp":
        return m["name"]
    e = m["esamp"]
    parts = [f"ESamp β {e['beta']:g}, lr {e['lr']:g}, warm-up {e['warmup_steps']}"]
    if m["temperature"] != 1.0:
        parts.append(f"T {m['temperature']:g}")
    if m["min_p"] > 0:
        parts.append(f"min-p {m['min_p']:g}")
    if m.get("exempt") == "recent":
        parts.append("exempt special + last 16 tokens (recent)")
    elif m.get("exempt") == "repeat":
        parts.append("exempt special + repeat-extending tokens (repeat)")
    elif m.get("exempt"):
        parts.append(f"exempt special ({m['exempt']})")
    return ", ".join(parts)


def render_markdown(results: Dict[str, Any]) -> str:
    """Two markdown tables (all methods; ESamp against the frontier) and the settings line."""
    st = results["settings"]
    runs, fr = results["runs"], results.get("frontier") or analyse(results)
    seeds = st["seeds"]
    lines = [f"{len(st['prompts'])} prompts x n = {st['n']} samples, {st['max_new_tokens']} new tokens, seeds "
             f"{', '.join(str(s) for s in seeds)} (mean ± sample std over seeds), model {st['model']}"
             + (f" ({st['dtype']})" if st.get("dtype") else "") + ".", ""]
    lines += ["| method | T | min-p | similarity ↓ | Vendi ↑ | distinct-1 ↑ | distinct-2 ↑ | PPL ↓ | loop rate ↓ "
              "| tail rate ↓ | within distinct-2 ↑ | tokens | EOS rate | tokens/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in results["methods"]:
        r = runs.get(m["name"], {})
        if not r:
            continue
        lines.append(
            f"| {_label(m)} | {m['temperature']:g} | {m['min_p']:g} | {_pm(_agg(r, 'similarity'), 4)} | "
            f"{_pm(_agg(r, 'vendi'), 2)} | {_pm(_agg(r, 'distinct_1'), 3)} | {_pm(_agg(r, 'distinct_2'), 3)} | "
            f"{_pm(_agg(r, 'ppl'), 1)} | {_pm(_agg(r, 'loop_rate'), 3)} | {_pm(_agg(r, 'tail_rate'), 4)} | "
            f"{_pm(_agg(r, 'within_distinct_2'), 3)} | {_pm(_agg(r, 'mean_tokens'), 1)} | "
            f"{_pm(_agg(r, 'eos_rate'), 2)} | {_f(_agg(r, 'tokens_per_s')[0], 0)} |")
    pts = fr.get("points", {})
    if pts:
        lines += ["", "ESamp against the baseline frontier (same seed; margins > 0 / similarity margins < 0 / PPL "
                  "ratios < 1 favour ESamp; n/a: PPL outside the baselines' range; excess > 0: ESamp degenerates more "
                  "than the baselines at the same Vendi, and then a Vendi margin is not a win):", "",
                  "| ESamp point | Vendi margin at equal PPL (mean ± std) | per seed | bootstrap 5–95 % | "
                  "similarity margin | PPL ratio at equal Vendi | loop-rate excess at equal Vendi | tail-rate excess "
                  "at equal Vendi | win? | tokens: baseline → ESamp | EOS rate: baseline → ESamp |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in results["methods"]:
            p = pts.get(m["name"])
            if p is None:
                continue
            vm = p["vendi_margin"]
            per = ", ".join(_f(x, 2, True) for x in vm["per_seed"])
            b = p.get("bootstrap") or {}
            boot = (f"[{_f(b.get('vendi_margin_q05'), 2, True)}, {_f(b.get('vendi_margin_q95'), 2, True)}]"
                    if b.get("vendi_margin_q05") is not None else "n/a")
            tok = (f"{_f(p.get('baseline_mean_tokens'), 1)} → {_f(p.get('esamp_mean_tokens'), 1)}"
                   if p.get("matched_baseline") else "n/a")
            eos = (f"{_f(p.get('baseline_eos_rate'), 2)} → {_f(p.get('esamp_eos_rate'), 2)}"
                   if p.get("matched_baseline") else "n/a")
            lines.append(f"| {_label(m)} | {_pm((vm['mean'], vm['std']), 2, True)} | {per} | {boot} | "
                         f"{_pm((p['sim_margin']['mean'], p['sim_margin']['std']), 4, True)} | "
                         f"{_pm((p['ppl_ratio']['mean'], p['ppl_ratio']['std']), 2)} | "
                         f"{_pm((p['loop_excess']['mean'], p['loop_excess']['std']), 3, True)} | "
                         f"{_pm((p['tail_excess']['mean'], p['tail_excess']['std']), 4, True)} | "
                         f"{'n/a' if p.get('win') is None else ('yes' if p['win'] else 'no')} | {tok} | {eos} |")
    return "\n".join(lines) + "\n"


def write_plots(results: Dict[str, Any], out_dir: str) -> List[str]:
    """frontier.png (PPL vs Vendi), metric_vs_beta.png, similarity_vs_position.png; returns the paths written
    (empty when matplotlib is missing)."""
    import os

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    runs, methods = results["runs"], results["methods"]
    st = results["settings"]
    title = f"{len(st['prompts'])} prompts x n={st['n']}, {st['max_new_tokens']} tokens, seeds {st['seeds']}"
    written = []

    # 1. frontier
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {"vanilla": "tab:blue", "min_p": "tab:green"}
    for fam in BASELINE_FAMILIES:
        ms = [m for m in methods if m["family"] == fam and runs.get(m["name"])]
        if not ms:
            continue
        xs = [_agg(runs[m["name"]], "ppl")[0] for m in ms]
        ys = [_agg(runs[m["name"]], "vendi")[0] for m in ms]
        order = np.argsort(xs)
        ax.plot(np.array(xs)[order], np.array(ys)[order], "-o", color=colors[fam], label=fam + " (T sweep)")
        for m, x, y in zip(ms, xs, ys):
            ax.annotate(f"T={m['temperature']:g}", (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    es = [m for m in methods if m["family"] == "esamp" and runs.get(m["name"])]
    cmap = plt.get_cmap("autumn")
    betas = sorted({m["esamp"]["beta"] for m in es}) or [0]
    markers = ["s", "^", "D", "v", "P", "X", "*", "h"]
    variants = sorted({(m["esamp"]["lr"], m["esamp"]["warmup_steps"], m.get("exempt") or "", m["temperature"],
                        m["min_p"]) for m in es})
    for m in es:
        x, xs_ = _agg(runs[m["name"]], "ppl")
        y, ys_ = _agg(runs[m["name"]], "vendi")
        c = cmap(betas.index(m["esamp"]["beta"]) / max(1, len(betas) - 1) * 0.8)
        vi = variants.index((m["esamp"]["lr"], m["esamp"]["warmup_steps"], m.get("exempt") or "", m["temperature"],
                             m["min_p"]))
        ax.errorbar(x, y, xerr=xs_ or 0, yerr=ys_ or 0, fmt=markers[vi % len(markers)], color=c, ms=6, capsize=2,
                    mec="k", mew=0.5)
    for vi, v in enumerate(variants):
        lbl = f"ESamp lr {v[0]:g}, wu {v[1]}" + (f", exempt {v[2]}" if v[2] else "") + \
            (f", T {v[3]:g}" if v[3] != 1.0 else "") + (f", min-p {v[4]:g}" if v[4] else "")
        ax.plot([], [], markers[vi % len(markers)], color="gray", mec="k", mew=0.5, label=lbl)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity under the base model (lower = more fluent)")
    ax.set_ylabel("Vendi score (higher = more diverse)")
    ax.set_title("Frontier: " + title + "\nESamp colour: β " + ", ".join(f"{b:g}" for b in betas)
                 + " (light = larger)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, "frontier.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)

    # 2. metric vs beta (one line per ESamp variant; dashed: the baseline at the same temperature / filter)
    if es:
        keys = [("vendi", "Vendi ↑"), ("similarity", "similarity ↓"), ("ppl", "PPL ↓"), ("mean_tokens", "tokens")]
        fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
        for ax, (key, lab) in zip(axes.flat, keys):
            for vi, v in enumerate(variants):
                ms = sorted([m for m in es if (m["esamp"]["lr"], m["esamp"]["warmup_steps"], m.get("exempt") or "",
                                               m["temperature"], m["min_p"]) == v], key=lambda m: m["esamp"]["beta"])
                xs = [m["esamp"]["beta"] for m in ms]
                ys = [_agg(runs[m["name"]], key) for m in ms]
                ax.errorbar(xs, [y[0] for y in ys], yerr=[y[1] or 0 for y in ys], marker=markers[vi % len(markers)],
                            capsize=2, label=f"lr {v[0]:g}, wu {v[1]}" + (f", ex {v[2]}" if v[2] else ""))
                base = _matching_baseline(ms[0], methods) if ms else None
                if base and runs.get(base):
                    ax.axhline(_agg(runs[base], key)[0], ls="--", color="gray", lw=1)
            ax.set_xlabel("β")
            ax.set_ylabel(lab)
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle("Metrics vs β (dashed: vanilla at the same T / filter, β = 0)\n" + title, fontsize=9)
        fig.tight_layout()
        p = os.path.join(out_dir, "metric_vs_beta.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

    # 3. similarity vs token position
    sp = results.get("similarity_by_position") or {}
    curves = sp.get("curves") or {}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in methods:
            if m["name"] not in curves:
                continue
            if m["family"] != "esamp" and abs(m["temperature"] - 1.0) > 1e-9 and m["family"] == "min_p":
                continue
            style = "-" if m["family"] == "esamp" else "--"
            ax.plot(sp["positions"], curves[m["name"]], style, marker="o", ms=3, label=_label(m)[:60])
        ax.set_xlabel("token position k (first k generated tokens)")
        ax.set_ylabel("mean pairwise cosine similarity")
        ax.set_title(f"Similarity vs position (seed {sp['seed']}); " + title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = os.path.join(out_dir, "similarity_vs_position.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written
