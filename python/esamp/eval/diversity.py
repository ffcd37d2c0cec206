"""Diversity / quality evaluation: vanilla sampling at several temperatures (and min-p settings) against ESamp
(beta x learning rate x warm-up), same prompts, same seeds, through the same generation loop (esamp.hf.generate).

Per method and seed, every prompt gets n samples.  Metrics (per prompt, then averaged over prompts):
  similarity   mean pairwise cosine similarity of MiniLM sentence embeddings (lower = more diverse)
  vendi        Vendi score of the n samples (1 .. n; higher = more diverse)
  distinct_1/2 unique word uni/bigrams over all word n-grams of the n samples
and pooled over all samples of the run:
  ppl          perplexity of the completions under the generating (base) model at T = 1, no filter
  mean_tokens  mean generated length (the stop token counted); eos_rate: share of samples that stopped on an
               end-of-sequence token within max_new_tokens (the termination check)
  tokens_per_s generation throughput of the run (a shared 2-core machine: indicative only)
The primary comparison is the frontier (esamp.eval.frontier): the baselines trace (PPL, Vendi) curves; every ESamp
point is reported by its Vendi margin over the best baseline at equal PPL, per seed and over seeds.

Every run is cached as JSON under OUT/runs/ (metrics and samples); ``resume=True`` reuses cached runs whose
settings match, so an interrupted evaluation continues where it stopped.  Results are reproducible from the seeds:
sample j of prompt p uses the per-row seed derived from (seed, p * n + j) for every method (coupled noise), and
the distiller of an ESamp run is initialised with init_seed = seed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..config import ESampConfig

__all__ = ["Method", "build_methods", "make_esamp", "esamp_method", "load_prompts", "BUILTIN_PROMPTS", "score_run",
           "run_method",
           "run_diversity", "DEFAULT_POSITIONS"]

BUILTIN_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prompts.jsonl")
DEFAULT_POSITIONS = (4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class Method:
    """One sampling method of the evaluation.  family: "vanilla" (temperature only), "min_p" (temperature with a
    min-p filter), "esamp" (ESamp, optionally with the special-token exemption of esamp.eval.exempt)."""

    name: str
    family: str
    temperature: float = 1.0
    min_p: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    esamp: Optional[ESampConfig] = None
    exempt: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        d = {"name": self.name, "family": self.family, "temperature": self.temperature, "min_p": self.min_p,
             "top_p": self.top_p, "top_k": self.top_k, "exempt": self.exempt}
        d["esamp"] = None if self.esamp is None else self.esamp.to_dict()
        return d


def _g(v: float) -> str:
    return f"{v:g}"


def esamp_method(config: ESampConfig, *, temperature: float = 1.0, min_p: float = 0.0,
                 exempt: Optional[str] = None) -> Method:
    name = (f"esamp b={_g(config.beta)} lr={_g(config.lr)} wu={config.warmup_steps}"
            + (f" rank={config.effective_rank}" if config.rank is not None else "")
            + (f" explore={config.explore_tokens}" if config.explore_tokens else "")
            + (f" gate={_g(config.gate_rel_err)}" if config.gate_rel_err is not None else "")
            + (f" T={_g(temperature)}" if temperature != 1.0 else "")
            + (f" min_p={_g(min_p)}" if min_p > 0 else "") + (f" exempt={exempt}" if exempt else ""))
    return Method(name, "esamp", temperature=temperature, min_p=min_p, esamp=config, exempt=exempt)


def build_methods(*, temperatures: Sequence[float] = (0.7, 0.85, 1.0, 1.15, 1.3),
                  baselines: Sequence[str] = ("vanilla", "min_p"), min_p: float = 0.05,
                  min_p_temperatures: Optional[Sequence[float]] = None, betas: Sequence[float] = (0.1, 0.25, 0.5),
                  lrs: Sequence[float] = (4e-4,), warmups: Sequence[int] = (30,), esamp_temperature: float = 1.0,
                  esamp_min_p: float = 0.0, exempt: Sequence[Optional[str]] = (None,),
                  base_config: Optional[ESampConfig] = None,
                  extra: Sequence[Dict[str, Any]] = ()) -> List[Method]:
    """The method list of a frontier evaluation: baseline sweeps + the ESamp grid beta x lr x warm-up x exempt +
    extra ESamp points (dicts with keys beta, lr, warmup, exempt, temperature, min_p; missing keys: defaults)."""
    base_config = base_config or ESampConfig()
    out: List[Method] = []
    for b in baselines:
        if b == "vanilla":
            out += [Method(f"vanilla T={_g(t)}", "vanilla", temperature=t) for t in temperatures]
        elif b == "min_p":
            for t in (min_p_temperatures or temperatures):
                out.append(Method(f"min_p={_g(min_p)} T={_g(t)}", "min_p", temperature=t, min_p=min_p))
        else:
            raise ValueError(f"baselines: expected entries 'vanilla' or 'min_p', got {b!r}")
    for beta in betas:
        for lr in lrs:
            for wu in warmups:
                for ex in exempt:
                    cfg = base_config.replace(beta=beta, lr=lr, warmup_steps=wu)
                    out.append(esamp_method(cfg, temperature=esamp_temperature, min_p=esamp_min_p, exempt=ex))
    for e in extra:
        unknown = set(e) - {"beta", "lr", "warmup", "exempt", "temperature", "min_p", "rank", "layers", "mode"}
        if unknown:
            raise ValueError(f"extra ESamp point: unknown keys {sorted(unknown)} in {e!r}")
        kw = {"beta": e.get("beta", base_config.beta), "lr": e.get("lr", base_config.lr),
              "warmup_steps": int(e.get("warmup", base_config.warmup_steps))}
        for k in ("rank", "layers", "mode"):
            if k in e:
                kw[k] = e[k]
        out.append(esamp_method(base_config.replace(**kw), temperature=e.get("temperature", esamp_temperature),
                                min_p=e.get("min_p", esamp_min_p), exempt=e.get("exempt") or None))
    names = [m.name for m in out]
    dup = {x for x in names if names.count(x) > 1}
    if dup:
        raise ValueError(f"methods: duplicate method names {sorted(dup)}")
    return out


def load_prompts(path: str = BUILTIN_PROMPTS, limit: Optional[int] = None) -> List[Dict[str, str]]:
    """Prompts of a JSON-lines file ({"id": ..., "prompt": ..., "category": ...} per line; a bare JSON string per
    line is accepted too)."""
    prompts = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if isinstance(obj, str):
                obj = {"prompt": obj}
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise ValueError(f"{path}:{lineno}: expected an object with a non-empty 'prompt' string")
            obj.setdefault("id", f"p{len(prompts)}")
            prompts.append(obj)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit: expected an int >= 1, got {limit}")
        prompts = prompts[:limit]
    return prompts


def _mean(v: Sequence[float]) -> float:
    v = [x for x in v if x == x]
    return sum(v) / len(v) if v else float("nan")


def score_run(out, model, embedder, *, pad_id: int, eos_ids: Sequence[int],
              base_logprobs: Optional[Sequence[Sequence[float]]] = None, tokenizer=None) -> Dict[str, Any]:
    """Metrics of one generation run (an esamp.hf.GenerationOutput): per prompt and aggregated.  PPL comes from
    `base_logprobs` (esamp.hf.generate(base_logprobs=True)) when given, else from a scoring pass (esamp.metrics.perplexity)."""
    from .. import metrics

    per_prompt: Dict[str, List[float]] = {"similarity": [], "vendi": [], "distinct_1": [], "distinct_2": [],
                                          "nll": [], "tokens": [], "eos": [], "samples": [], "loops": [],
                                          "tail": [], "within_distinct_2": []}
    ws_ids = metrics.ignored_token_ids(tokenizer, [t for g in out.token_ids for ids in g for t in ids]) \
        if tokenizer is not None else []
    if base_logprobs is None:
        prompts, comps = [], []
        for p, group in enumerate(out.token_ids):
            for ids in group:
                prompts.append(out.prompt_token_ids[p])
                comps.append(ids)
        ppl = metrics.perplexity(model, prompts, comps, pad_id=pad_id, batch_size=32)
        nll_rows, tok_rows = ppl["nll"], ppl["tokens"]
    else:
        nll_rows = [-float(sum(lp)) for lp in base_logprobs]
        tok_rows = [len(lp) for lp in base_logprobs]
    eos = set(eos_ids)
    r = 0
    for p, texts in enumerate(out.texts):
        emb = embedder.encode(texts)
        per_prompt["similarity"].append(metrics.pairwise_similarity(emb))
        per_prompt["vendi"].append(metrics.vendi_score(emb))
        per_prompt["distinct_1"].append(metrics.distinct_n(texts, 1))
        per_prompt["distinct_2"].append(metrics.distinct_n(texts, 2))
        k = len(texts)
        per_prompt["nll"].append(sum(nll_rows[r:r + k]))
        per_prompt["tokens"].append(sum(tok_rows[r:r + k]))
        per_prompt["eos"].append(sum(1 for ids in out.token_ids[p] if ids and ids[-1] in eos))
        per_prompt["samples"].append(k)
        per_prompt["loops"].append(sum(1 for ids, tx in zip(out.token_ids[p], texts)
                                       if metrics.has_loop(ids, tx, ignore_ids=ws_ids)))
        if base_logprobs is not None:
            lim = math.log(metrics.TAIL_PROB)
            per_prompt["tail"].append(sum(1 for lp in base_logprobs[r:r + k] for v in lp if v < lim))
        per_prompt["within_distinct_2"].append(metrics.within_distinct_n(texts, 2))
        r += k
    rows = sum(per_prompt["samples"])
    tok = sum(per_prompt["tokens"])
    agg = {
        "similarity": _mean(per_prompt["similarity"]),
        "vendi": _mean(per_prompt["vendi"]),
        "distinct_1": _mean(per_prompt["distinct_1"]),
        "distinct_2": _mean(per_prompt["distinct_2"]),
        "ppl": math.exp(sum(per_prompt["nll"]) / tok) if tok else float("nan"),
        "mean_tokens": tok / rows if rows else float("nan"),
        "eos_rate": sum(per_prompt["eos"]) / rows if rows else float("nan"),
        "loop_rate": sum(per_prompt["loops"]) / rows if rows else float("nan"),
        "tail_rate": (sum(per_prompt["tail"]) / tok if tok and base_logprobs is not None else float("nan")),
        "within_distinct_2": _mean(per_prompt["within_distinct_2"]),
        "tokens_per_s": out.stats.get("tokens_per_s", float("nan")),
        "gen_s": out.stats.get("prefill_s", 0.0) + out.stats.get("decode_s", 0.0),
    }
    if "trainer" in out.stats:
        agg["rows_trained"] = out.stats["trainer"].get("rows_trained")
        agg["rows_skipped"] = out.stats["trainer"].get("rows_skipped")
        agg["warmup_s"] = out.stats.get("warmup_s")
    return {"metrics": agg, "per_prompt": per_prompt}


def make_esamp(model, tokenizer, method: Method, *, seed: int, slots: int):
    """The `esamp=` argument of esamp.hf.generate for `method` (None for a baseline): its ESampConfig with
    init_seed = seed, or an exempting sampler (esamp.eval.exempt) when the method asks for one."""
    from .exempt import make_exempt_sampler

    if method.esamp is None:
        return None
    cfg = method.esamp.replace(init_seed=seed)
    return cfg if method.exempt is None else make_exempt_sampler(model, cfg, tokenizer, mode=method.exempt,
                                                                 slots=slots)


def run_method(model, tokenizer, prompts: Sequence[str], method: Method, *, n: int, max_new_tokens: int, seed: int,
               chat: bool = True, progress: bool = False, base_logprobs: bool = False):
    """One generation run of `method` (an esamp.hf.GenerationOutput).  With ``base_logprobs=True`` returns
    (output, per-completion base-model log-probabilities of the generated tokens) instead: they are computed in
    the generation loop itself (esamp.hf.generate(base_logprobs=True): the log-softmax of the UNMIXED LM-head
    input, one extra LM-head product per step on the latent-mixing path), identical to a separate scoring pass."""
    from .. import hf

    es = make_esamp(model, tokenizer, method, seed=seed, slots=len(prompts))
    out = hf.generate(model, tokenizer, list(prompts), n=n, max_new_tokens=max_new_tokens,
                      temperature=method.temperature, top_k=method.top_k, top_p=method.top_p,
                      min_p=method.min_p, seed=seed, esamp=es, chat=chat, progress=progress,
                      desc=method.name[:40], base_logprobs=base_logprobs)
    if base_logprobs:
        return out, [lp for g in out.base_logprobs for lp in g]
    return out


def _run_key(method: Method, settings: Dict[str, Any], seed: int) -> str:
    blob = json.dumps({"method": method.to_dict(), "settings": settings, "seed": seed, "v": 2}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in name)


def run_diversity(model, tokenizer, prompts: Sequence[Dict[str, str]], methods: Sequence[Method], *, n: int = 16,
                  max_new_tokens: int = 64, seeds: Sequence[int] = (0, 1), out_dir: str = "esamp_eval",
                  chat: bool = True, positions: Optional[Sequence[int]] = None, position_seed: Optional[int] = None,
                  embedder=None, resume: bool = True, progress: bool = True, model_name: str = "default",
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every method for every seed, score the runs and return the results dict (also written to
    OUT/results.json).  Similarity-vs-position curves are computed on `position_seed` (default: the first seed)."""
    import torch

    from .. import hf, metrics

    if n < 2:
        raise ValueError(f"n: expected >= 2 samples per prompt (pairwise metrics), got {n}")
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    texts = [p["prompt"] for p in prompts]
    # the dtype the model runs in is part of every cached run's key (a bfloat16 run is not a float32 run)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    settings = {"prompts": texts, "n": n, "max_new_tokens": max_new_tokens, "chat": chat, "model": model_name,
                "dtype": dtype}
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    embedder = embedder or metrics.Embedder()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = hf._eos_ids(model, tokenizer)
    if positions is None:
        positions = [k for k in DEFAULT_POSITIONS if k < max_new_tokens] + [max_new_tokens]
    position_seed = seeds[0] if position_seed is None else position_seed

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(m, s) for s in seeds for m in methods]
    bar = tqdm(total=len(jobs), desc="eval runs", unit="run", disable=not progress) if tqdm else None
    runs: Dict[str, Dict[str, Any]] = {m.name: {} for m in methods}
    curves: Dict[str, List[float]] = {}
    t0 = time.perf_counter()
    try:
        for m, seed in jobs:
            key = _run_key(m, settings, seed)
            path = os.path.join(out_dir, "runs", f"{_safe(m.name)}_s{seed}_{key}.json")
            rec = None
            if resume and os.path.isfile(path):
                with open(path) as f:
                    rec = json.load(f)
                if seed == position_seed and "positions" not in rec:
                    rec = None                     # cached without the curve this call needs: run again
            if rec is None:
                out, blp = run_method(model, tokenizer, texts, m, n=n, max_new_tokens=max_new_tokens, seed=seed,
                                      chat=chat, progress=progress, base_logprobs=True)
                if m.esamp is not None and out.stats["trainer"]["rows_trained"] == 0:
                    raise RuntimeError(f"{m.name} seed {seed}: the distiller trained zero rows (failed run)")
                rec = {"method": m.to_dict(), "seed": seed, "settings": settings}
                rec.update(score_run(out, model, embedder, pad_id=pad_id, eos_ids=eos_ids, base_logprobs=blp,
                                     tokenizer=tokenizer))
                rec["texts"] = out.texts
                if seed == position_seed:
                    rec["positions"] = {"k": list(positions), "similarity": metrics.similarity_by_position(
                        embedder, tokenizer, out.token_ids, positions)}
                with open(path, "w") as f:
                    json.dump(rec, f)
            runs[m.name][str(seed)] = {"metrics": rec["metrics"], "per_prompt": rec["per_prompt"]}
            if seed == position_seed:
                curves[m.name] = rec["positions"]["similarity"]
            if bar is not None:
                bar.update(1)
                mt = rec["metrics"]
                bar.set_postfix_str(f"{m.name[:28]} s{seed}: vendi {mt['vendi']:.2f} ppl {mt['ppl']:.1f}")
    finally:
        if bar is not None:
            bar.close()
    from .frontier import analyse

    results = {
        "settings": {**settings, "seeds": list(seeds), "prompt_ids": [p.get("id") for p in prompts],
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "methods": [m.to_dict() for m in methods],
        "runs": runs,
        "similarity_by_position": {"seed": position_seed, "positions": list(positions), "curves": curves},
        "wall_s": time.perf_counter() - t0,
    }
    results["frontier"] = analyse(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {out_dir}/results.json ({len(jobs)} runs, {results['wall_s']:.0f} s)")
    return results
