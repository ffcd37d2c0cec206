"""pass@k on real benchmark suites (`esamp eval passk --suite gsm8k|humaneval`): vanilla vs ESamp, paired.

Protocol (the same for every method, so differences are the methods' own):
- every method samples n completions per problem through the same loop (esamp.hf.generate), with the same
  per-sample random numbers: sample j of problem i (its index in the suite, e.g. the GSM8K file number) uses the
  Philox seed ``splitmix64(seed + i * n + j)`` whatever the split, chunking or method -- vanilla and ESamp draws
  share their Gumbel noise, which pairs the comparison;
- problems run in chunks of consecutive indices (``batch_rows`` rows at a time); every chunk of every
  (method, seed) is cached under ``OUT/runs/`` with its samples, so an interrupted evaluation resumes, and several
  worker processes (``workers``) can share the work -- each takes every W-th chunk;
- pass@k = the unbiased estimator 1 - C(n - c, k) / C(n, k) per problem, averaged over problems (and seeds);
- the ESamp - baseline difference of pass@k is reported with a paired bootstrap over problems (the same resample
  of problems for both methods; 90 % interval from the 5 and 95 % quantiles);
- what can fool the metric is reported beside it: mean length, share of samples that hit the token budget, loop
  rate (esamp.metrics.find_loop) and, for ESamp, rows trained.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from .diversity import Method
from .passk import pass_at_k_curve

__all__ = ["run_suite", "aggregate", "render_markdown", "write_plot", "bootstrap_diff", "ks_for", "chunks_of"]


def ks_for(n: int) -> List[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def chunks_of(indices: Sequence[int], n: int, batch_rows: int) -> List[List[int]]:
    """Split problem indices into chunks of consecutive indices with at most max(1, batch_rows // n) problems."""
    per = max(1, batch_rows // n)
    out: List[List[int]] = []
    cur: List[int] = []
    for i in indices:
        if cur and (len(cur) >= per or i != cur[-1] + 1):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _key(method: Method, suite: str, chunk: Sequence[int], n: int, max_new_tokens: int, seed: int,
         model_name: str, dtype: str) -> str:
    blob = json.dumps({"method": method.to_dict(), "suite": suite, "chunk": list(chunk), "n": n,
                       "max_new_tokens": max_new_tokens, "seed": seed, "model": model_name, "dtype": dtype,
                       "v": 1}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in name)


def _run_chunk(model, tokenizer, suite, method: Method, chunk_pos: Sequence[int], *, n: int, max_new_tokens: int,
               seed: int, progress: bool) -> Dict[str, Any]:
    from .. import hf, metrics
    from .diversity import make_esamp

    probs = [suite.problems[p] for p in chunk_pos]
    prompts = [suite.prompts[p] for p in chunk_pos]
    first = probs[0]["index"]
    es = make_esamp(model, tokenizer, method, seed=seed, slots=len(prompts))
    t0 = time.perf_counter()
    out = hf.generate(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=method.temperature,
                      top_k=method.top_k, top_p=method.top_p, min_p=method.min_p, seed=seed + first * n, esamp=es,
                      chat=suite.chat, progress=progress, desc=f"{method.name[:30]} {probs[0]['id']}",
                      stop=list(suite.stop) or None)
    wall = time.perf_counter() - t0
    ok = suite.grade(probs, out.texts)
    eos = set(hf._eos_ids(model, tokenizer))
    ws = metrics.ignored_token_ids(tokenizer, [t for g in out.token_ids for ids in g for t in ids])
    rec = {"method": method.name, "seed": seed, "problems": [p["id"] for p in probs],
           "indices": [p["index"] for p in probs], "texts": out.texts, "correct": ok,
           "tokens": [[len(ids) for ids in g] for g in out.token_ids],
           "truncated": [[len(ids) >= max_new_tokens and not (ids and ids[-1] in eos) for ids in g]
                         for g in out.token_ids],
           "loop": [[metrics.has_loop(ids, text, ignore_ids=ws) for ids, text in zip(g, tg)]
                    for g, tg in zip(out.token_ids, out.texts)],
           "token_ids": out.token_ids,
           "wall_s": wall, "generated_tokens": out.stats["generated_tokens"]}
    if "trainer" in out.stats:
        rec["rows_trained"] = out.stats["trainer"]["rows_trained"]
        rec["rows_skipped"] = out.stats["trainer"]["rows_skipped"]
        if rec["rows_trained"] == 0:
            raise RuntimeError(f"{method.name} seed {seed}: the distiller trained zero rows (failed run)")
    return rec


def run_suite(model, tokenizer, suite, methods: Sequence[Method], *, n: int = 16, max_new_tokens: Optional[int] = None,
              seeds: Sequence[int] = (0,), out_dir: str = "esamp_eval_passk", batch_rows: int = 256,
              shard: Optional[Sequence[int]] = None, model_name: str = "model", dtype: str = "float32",
              progress: bool = True, resume: bool = True, log: Callable[[str], None] = print) -> int:
    """Generate + grade every chunk of every (method, seed) that is not cached yet (this process's shard only:
    shard = (i, W) takes chunks i, i + W, ...).  Returns the number of chunks run."""
    max_new_tokens = max_new_tokens or suite.max_new_tokens
    runs_dir = os.path.join(out_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    pos_of = {p["index"]: k for k, p in enumerate(suite.problems)}
    chunks = chunks_of([p["index"] for p in suite.problems], n, batch_rows)
    jobs = [(m, s, c) for s in seeds for m in methods for c in chunks]
    if shard is not None:
        i, W = shard
        jobs = jobs[i::W]
    todo = []
    for m, s, c in jobs:
        path = os.path.join(runs_dir, f"{_safe(m.name)}_s{s}_{c[0]}-{c[-1]}_"
                            f"{_key(m, suite.name, c, n, max_new_tokens, s, model_name, dtype)}.json")
        if not (resume and os.path.isfile(path)):
            todo.append((m, s, c, path))
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(todo), desc=f"{suite.name} chunks", unit="chunk", disable=not progress) if tqdm else None
    done = 0
    try:
        for m, s, c, path in todo:
            rec = _run_chunk(model, tokenizer, suite, m, [pos_of[i] for i in c], n=n, max_new_tokens=max_new_tokens,
                             seed=s, progress=progress)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(rec, f)
            os.replace(tmp, path)
            done += 1
            if bar is not None:
                bar.update(1)
                acc = sum(sum(g) for g in rec["correct"]) / max(1, sum(len(g) for g in rec["correct"]))
                bar.set_postfix_str(f"{m.name[:24]} s{s} {c[0]}-{c[-1]}: acc {acc:.2f}, "
                                    f"{rec['generated_tokens'] / max(rec['wall_s'], 1e-9):.0f} tok/s")
    finally:
        if bar is not None:
            bar.close()
    return done


def _load_records(out_dir, suite, methods, n, max_new_tokens, seeds, model_name, dtype, batch_rows):
    chunks = chunks_of([p["index"] for p in suite.problems], n, batch_rows)
    recs: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    missing = []
    for m in methods:
        recs[m.name] = {}
        for s in seeds:
            lst = []
            for c in chunks:
                path = os.path.join(out_dir, "runs", f"{_safe(m.name)}_s{s}_{c[0]}-{c[-1]}_"
                                    f"{_key(m, suite.name, c, n, max_new_tokens, s, model_name, dtype)}.json")
                if os.path.isfile(path):
                    with open(path) as f:
                        lst.append(json.load(f))
                else:
                    missing.append(path)
            recs[m.name][s] = lst
    return recs, missing


def bootstrap_diff(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *, resamples: int = 2000,
                   seed: int = 0) -> Dict[str, List[float]]:
    """Paired bootstrap over problems of mean(a) - mean(b) for every k: a[p][k], b[p][k] per problem.  Returns
    {"mean": [...], "lo": [...] (5 %), "hi": [...] (95 %), "p_le_0": [...] (share of resamples with diff <= 0)}."""
    import numpy as np

    A, B = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if A.shape != B.shape or A.ndim != 2 or A.shape[0] == 0:
        raise ValueError(f"a, b: expected equal [problems, k] arrays, got {A.shape} and {B.shape}")
    D = A - B
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, D.shape[0], size=(resamples, D.shape[0]))
    means = D[idx].mean(axis=1)                                   # [resamples, k]
    return {"mean": D.mean(axis=0).tolist(), "lo": np.quantile(means, 0.05, axis=0).tolist(),
            "hi": np.quantile(means, 0.95, axis=0).tolist(), "p_le_0": (means <= 0).mean(axis=0).tolist()}


def _loop_flags(rec: Dict[str, Any], tokenizer) -> List[List[bool]]:
    """Loop flags of a chunk's samples recomputed with the current rule (esamp.metrics.find_loop) from the stored
    token ids (or, for chunks stored without them, the re-tokenised texts)."""
    from .. import metrics

    ids = rec.get("token_ids")
    if ids is None:
        ids = [[tokenizer(t, add_special_tokens=False)["input_ids"] for t in g] for g in rec["texts"]]
    ign = metrics.ignored_token_ids(tokenizer, [t for g in ids for s in g for t in s])
    return [[metrics.has_loop(s, tx, ignore_ids=ign) for s, tx in zip(g, tg)] for g, tg in zip(ids, rec["texts"])]


def aggregate(out_dir: str, suite, methods: Sequence[Method], *, n: int, max_new_tokens: Optional[int] = None,
              seeds: Sequence[int] = (0,), model_name: str = "model", dtype: str = "float32", batch_rows: int = 256,
              baseline: Optional[str] = None, allow_missing: bool = False, tokenizer=None) -> Dict[str, Any]:
    """Results of every method from the cached chunks: pass@k curves (per seed and mean), per-problem curves,
    degeneration figures, and the paired bootstrap of every method against `baseline` (default: the first
    method whose family is not "esamp")."""
    max_new_tokens = max_new_tokens or suite.max_new_tokens
    recs, missing = _load_records(out_dir, suite, methods, n, max_new_tokens, seeds, model_name, dtype, batch_rows)
    if missing and not allow_missing:
        raise RuntimeError(f"{len(missing)} chunks are not cached yet (first: {missing[0]}); run them first")
    ks = ks_for(n)
    ids = suite.ids
    res: Dict[str, Any] = {"settings": {"suite": suite.name, "description": suite.description, "problems": ids,
                                        "n": n, "max_new_tokens": max_new_tokens, "seeds": list(seeds),
                                        "model": model_name, "dtype": dtype, "ks": ks},
                           "methods": [m.to_dict() for m in methods], "runs": {}, "missing_chunks": len(missing)}
    per_problem: Dict[str, Dict[str, List[float]]] = {}
    for m in methods:
        curves_by_pid: Dict[str, List[List[float]]] = {}
        agg = {"tokens": 0, "samples": 0, "truncated": 0, "loops": 0, "correct": 0, "wall_s": 0.0, "gen": 0,
               "rows_trained": 0, "rows_skipped": 0}
        seed_curves = {}
        for s in seeds:
            pcurves = []
            for rec in recs[m.name][s]:
                loops = _loop_flags(rec, tokenizer) if tokenizer is not None else rec["loop"]
                for pid, ok, toks, tr, lp in zip(rec["problems"], rec["correct"], rec["tokens"], rec["truncated"],
                                                 loops):
                    c = pass_at_k_curve(n, int(sum(ok)))
                    curves_by_pid.setdefault(pid, []).append(c)
                    pcurves.append(c)
                    agg["tokens"] += sum(toks)
                    agg["samples"] += len(toks)
                    agg["truncated"] += sum(tr)
                    agg["loops"] += sum(lp)
                    agg["correct"] += sum(ok)
                agg["wall_s"] += rec["wall_s"]
                agg["gen"] += rec["generated_tokens"]
                agg["rows_trained"] += rec.get("rows_trained", 0)
                agg["rows_skipped"] += rec.get("rows_skipped", 0)
            if pcurves:
                seed_curves[str(s)] = [sum(c[k - 1] for c in pcurves) / len(pcurves) for k in ks]
        pp = {pid: [sum(c[k - 1] for c in cs) / len(cs) for k in ks] for pid, cs in curves_by_pid.items()}
        per_problem[m.name] = pp
        S = max(1, agg["samples"])
        res["runs"][m.name] = {
            "pass_at_k": [sum(v[i] for v in pp.values()) / max(1, len(pp)) for i in range(len(ks))],
            "per_seed": seed_curves, "problems": len(pp),
            "solved": sum(1 for v in pp.values() if v[-1] > 0),
            "mean_tokens": agg["tokens"] / S, "truncated_rate": agg["truncated"] / S, "loop_rate": agg["loops"] / S,
            "accuracy": agg["correct"] / S, "tokens_per_s": agg["gen"] / agg["wall_s"] if agg["wall_s"] else None,
            "rows_trained": agg["rows_trained"], "rows_skipped": agg["rows_skipped"],
            "per_problem": pp}
    if baseline is None:
        baseline = next((m.name for m in methods if m.family != "esamp"), methods[0].name)
    res["baseline"] = baseline
    res["vs_baseline"] = {}
    base = per_problem.get(baseline, {})
    for m in methods:
        if m.name == baseline:
            continue
        common = [pid for pid in ids if pid in base and pid in per_problem[m.name]]
        if not common:
            continue
        bs = bootstrap_diff([per_problem[m.name][p] for p in common], [base[p] for p in common])
        bs["problems"] = len(common)
        res["vs_baseline"][m.name] = bs
    return res


def render_markdown(res: Dict[str, Any]) -> str:
    st = res["settings"]
    ks = st["ks"]
    show = [k for k in ks if k in (1, 2, 4, 8, 16, 32, 64, st["n"])]
    lines = [f"{st['description']}; n = {st['n']} samples per problem, up to {st['max_new_tokens']} new tokens, "
             f"seeds {', '.join(map(str, st['seeds']))}; model {st['model']} ({st['dtype']}). pass@k: unbiased "
             f"estimator, mean over problems (and seeds). Δ: paired difference to **{res['baseline']}** with its "
             "90 % bootstrap interval over problems.", "",
             "| method | " + " | ".join(f"pass@{k}" for k in show)
             + " | solved | tokens | truncated | loop rate |",
             "|---|" + "---|" * (len(show) + 4)]
    for m in res["methods"]:
        r = res["runs"][m["name"]]
        lines.append(f"| {m['name']} | " + " | ".join(f"{r['pass_at_k'][ks.index(k)]:.3f}" for k in show)
                     + f" | {r['solved']}/{r['problems']} | {r['mean_tokens']:.0f} | {r['truncated_rate']:.3f} | "
                     f"{r['loop_rate']:.3f} |")
    if res["vs_baseline"]:
        lines += ["", "| Δ vs " + res["baseline"] + " | " + " | ".join(f"pass@{k}" for k in show) + " |",
                  "|---|" + "---|" * len(show)]
        for name, d in res["vs_baseline"].items():
            cells = []
            for k in show:
                i = ks.index(k)
                cells.append(f"{d['mean'][i]:+.3f} [{d['lo'][i]:+.3f}, {d['hi'][i]:+.3f}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if res.get("missing_chunks"):
        lines += ["", f"**{res['missing_chunks']} chunks missing: partial results.**"]
    return "\n".join(lines) + "\n"


def write_plot(res: Dict[str, Any], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ks = res["settings"]["ks"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in res["methods"]:
        r = res["runs"][m["name"]]
        ax.plot(ks, r["pass_at_k"], marker="o", ms=3, label=m["name"],
                ls="-" if m["family"] == "esamp" else "--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (mean over problems)")
    ax.set_title(f"{res['settings']['suite']} ({len(res['settings']['problems'])} problems, n = {res['settings']['n']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def pass_frontier(res: Dict[str, Any], k: int) -> List[Dict[str, Any]]:
    """(pass@1, pass@k) of every method: the trade-off temperature and min-p trace, and where ESamp lies."""
    ks = res["settings"]["ks"]
    i = ks.index(k)
    return [{"method": m["name"], "family": m["family"], "pass@1": res["runs"][m["name"]]["pass_at_k"][0],
             f"pass@{k}": res["runs"][m["name"]]["pass_at_k"][i]} for m in res["methods"]]


def _isfinite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
