"""`esamp demo`: vanilla vs ESamp on the embedded SmolLM2-135M-Instruct, same prompts, same seeds.

Prints samples side by side and a table (mean pairwise embedding similarity, Vendi score, distinct-n, perplexity
under the base model, mean length, tokens/s and the ESamp overhead) and writes results.json, samples.md and
similarity_vs_position.png (pairwise similarity of the first-k-token prefixes against k, cf. the paper's Figure 4)
into the output folder.
"""
from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
from typing import Dict, List, Optional, Sequence

from .config import ESampConfig

__all__ = ["DEMO_PROMPTS", "run_demo"]

DEMO_PROMPTS = [
    "Write the opening sentence of a story about a lighthouse keeper.",
    "Invent a new fruit and describe its taste in two sentences.",
    "Describe a city on Mars in two sentences.",
    "Suggest an unusual theme for a birthday party.",
    "Write a short poem about rain.",
    "Give one surprising use for an old umbrella.",
]


def _fmt(v, digits=3):
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def _group_metrics(out, model, embedder, pad_id: int) -> Dict[str, float]:
    from . import metrics

    sims, vendis, d1, d2 = [], [], [], []
    for texts in out.texts:
        emb = embedder.encode(texts)
        sims.append(metrics.pairwise_similarity(emb))
        vendis.append(metrics.vendi_score(emb))
        d1.append(metrics.distinct_n(texts, 1))
        d2.append(metrics.distinct_n(texts, 2))
    prompts, comps = [], []
    for p, group in enumerate(out.token_ids):
        for ids in group:
            prompts.append(out.prompt_token_ids[p])
            comps.append(ids)
    ppl = metrics.perplexity(model, prompts, comps, pad_id=pad_id)["ppl"]

    def mean(v):
        v = [x for x in v if x == x]
        return sum(v) / len(v) if v else float("nan")

    return {"similarity": mean(sims), "vendi": mean(vendis), "distinct_1": mean(d1), "distinct_2": mean(d2),
            "ppl": ppl, "mean_tokens": out.stats["mean_length"], "tokens_per_s": out.stats["tokens_per_s"],
            "row_steps_per_s": out.stats["row_steps_per_s"], "gen_s": out.stats["prefill_s"] + out.stats["decode_s"]}


def _side_by_side(prompts: Sequence[str], a, b, show: int, width: int) -> str:
    col = max(30, (width - 3) // 2)
    lines = []
    for p, prompt in enumerate(prompts):
        lines.append("")
        lines.append(f"Prompt {p + 1}: {prompt}")
        lines.append(f"{'vanilla':<{col}} | ESamp")
        lines.append("-" * col + "-+-" + "-" * col)
        for j in range(min(show, len(a.texts[p]))):
            left = textwrap.wrap(" ".join(a.texts[p][j].split())[: col * 3], col) or [""]
            right = textwrap.wrap(" ".join(b.texts[p][j].split())[: col * 3], col) or [""]
            for i in range(max(len(left), len(right))):
                lines.append(f"{(left[i] if i < len(left) else ''):<{col}} | {right[i] if i < len(right) else ''}")
            lines.append(f"{'':<{col}} |")
    return "\n".join(lines)


def _plot(path: str, positions, curves: Dict[str, List[float]], title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in curves.items():
        ax.plot(positions, ys, marker="o", label=label)
    ax.set_xlabel("token position k (first k generated tokens)")
    ax.set_ylabel("mean pairwise cosine similarity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_demo(*, model_path: Optional[str] = None, prompts: Optional[Sequence[str]] = None, n: int = 8,
             max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, seed: int = 0, config: Optional[ESampConfig] = None, out_dir: str = "esamp_demo",
             show: int = 3, progress: bool = True, plot: bool = True, print_fn=print) -> dict:
    """Run the demo and return the results dict (also written to out_dir/results.json)."""
    import torch

    from . import hf, metrics, models

    t_all = time.perf_counter()
    config = config or ESampConfig()
    if not progress:
        try:
            from transformers.utils import logging as tlog
            tlog.disable_progress_bar()
        except Exception:  # pragma: no cover - cosmetic only
            pass
    prompts = list(prompts) if prompts else list(DEMO_PROMPTS)
    print_fn(f"esamp demo: {len(prompts)} prompts x n = {n}, {max_new_tokens} new tokens, T = {temperature}, "
             f"top_k = {top_k}, top_p = {top_p}, min_p = {min_p}, seed = {seed}; torch threads = "
             f"{torch.get_num_threads()}")
    print_fn(f"ESamp: beta = {config.beta}, mode = {config.mode}, rank = {config.effective_rank}, "
             f"layers = {config.layers}, lr = {config.lr}, warm-up steps = {config.warmup_steps}")
    t0 = time.perf_counter()
    print_fn("loading the model" + (f" {model_path}" if model_path else " SmolLM2-135M-Instruct (embedded)") + " ...")
    model, tok = models.load(model_path)
    load_s = time.perf_counter() - t0
    print_fn(f"  loaded {type(model).__name__} in {load_s:.1f} s")

    common = dict(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  min_p=min_p, seed=seed, progress=progress)
    # one tiny call of each kind first, so that one-off costs (thread pools, first-call dispatch) hit neither timing
    hf.generate(model, tok, prompts[:1], n=1, max_new_tokens=2, esamp=None, progress=False)
    hf.generate(model, tok, prompts[:1], n=1, max_new_tokens=2, esamp=config, progress=False)
    van = hf.generate(model, tok, prompts, esamp=None, desc="vanilla", **common)
    esa = hf.generate(model, tok, prompts, esamp=config, desc="ESamp", **common)

    width = shutil.get_terminal_size((120, 20)).columns
    print_fn(_side_by_side(prompts, van, esa, show, min(width, 160)))

    print_fn("\nscoring (MiniLM embeddings, perplexity under the base model) ...")
    embedder = metrics.Embedder()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    mv = _group_metrics(van, model, embedder, pad_id)
    me = _group_metrics(esa, model, embedder, pad_id)
    trainer = esa.stats["trainer"]
    overhead = mv["row_steps_per_s"] / me["row_steps_per_s"] - 1.0

    rows = [("mean pairwise similarity (lower = more diverse)", "similarity", 4),
            ("Vendi score (higher = more diverse)", "vendi", 2),
            ("distinct-1", "distinct_1", 3), ("distinct-2", "distinct_2", 3),
            ("perplexity under the base model (lower = more fluent)", "ppl", 2),
            ("mean generated tokens", "mean_tokens", 1),
            ("generated tokens / s", "tokens_per_s", 1),
            ("row-steps / s (batch rows x decode steps)", "row_steps_per_s", 1)]
    lw = max(len(r[0]) for r in rows)
    table = [f"{'metric':<{lw}} | {'vanilla':>10} | {'ESamp':>10}", "-" * lw + "-+-" + "-" * 10 + "-+-" + "-" * 10]
    for label, key, d in rows:
        table.append(f"{label:<{lw}} | {_fmt(mv[key], d):>10} | {_fmt(me[key], d):>10}")
    table.append(f"{'ESamp overhead per decode step (row-steps/s ratio)':<{lw}} | {'':>10} | "
                 f"{100 * overhead:>+9.1f}%")
    table.append(f"{'distiller rows trained / skipped (incl. warm-up)':<{lw}} | {'':>10} | "
                 f"{trainer['rows_trained']:>5} / {trainer['rows_skipped']}")
    print_fn("\n" + "\n".join(table))

    positions = sorted({k for k in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if k <= max_new_tokens}
                       | {max_new_tokens})
    os.makedirs(out_dir, exist_ok=True)
    curves = {"vanilla": metrics.similarity_by_position(embedder, tok, van.token_ids, positions),
              f"ESamp (beta={config.beta})": metrics.similarity_by_position(embedder, tok, esa.token_ids, positions)}
    png = os.path.join(out_dir, "similarity_vs_position.png")
    wrote_png = plot and _plot(png, positions, curves,
                               f"{type(model).__name__}: {len(prompts)} prompts x n={n}, T={temperature}")

    results = {
        "settings": {"prompts": prompts, "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature,
                     "top_k": top_k, "top_p": top_p, "min_p": min_p, "seed": seed, "model": model_path or "default",
                     "esamp": config.to_dict(), "torch_threads": torch.get_num_threads()},
        "vanilla": mv, "esamp": me, "esamp_overhead": overhead, "trainer": trainer,
        "similarity_by_position": {"positions": positions, **curves},
        "load_s": load_s,
        "samples": {"vanilla": van.texts, "esamp": esa.texts},
    }
    with open(os.path.join(out_dir, "samples.md"), "w") as f:
        f.write(_side_by_side(prompts, van, esa, n, 160) + "\n")
    results["wall_s"] = time.perf_counter() - t_all
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_fn(f"\nwrote {out_dir}/results.json, {out_dir}/samples.md"
             + (f", {png}" if wrote_png else " (no plot: matplotlib missing or --no-plot)"))
    print_fn(f"demo done in {results['wall_s']:.1f} s (model load {load_s:.1f} s)")
    return results
