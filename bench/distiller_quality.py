"""How well does the online distiller predict on real decode trajectories?  (evidence for ESamp's settings)

ESamp's correction on the candidate set is beta * (l - d), d = W f(x) the distiller's logits.  It can only steer
towards "novel" continuations if d is a meaningful prediction of l; where the distiller is poor, l - d is noise
of several nats and ESamp injects it into the sampling distribution.  This program replays the online training
of one per-prompt distiller on recorded samples -- exactly the rows esamp.hf.generate would hand it (warm start
on every prompt position, then at decode step k the rows of all n samples at generated position k, one optimizer
step per decode step) -- and reports, per window of decode steps, how the prediction made BEFORE the step's update
compares with the truth:

  rel_err     ||t - t_hat||^2 / ||t||^2 (t: the LM-head input)
  top1        share of rows where argmax W t_hat == argmax W t
  cand_sd     standard deviation over the min-p 0.1 candidates (T = 1) of l_c - d_c, on rows with >= 2
              candidates (the size of ESamp's perturbation is beta times this)
  cand_corr   correlation over those candidates of (l_c - d_c) with l_c (1 = pure sharpening, 0 = noise)

Usage (samples from an `esamp eval passk --suite gsm8k` run's cache, or any JSON with token_ids):
  PYTHONPATH=python python bench/distiller_quality.py --samples RUN.json --problems 0,1 \\
      --config lr=4e-4,warmup=30 --config lr=1e-3,warmup=100 --out bench/results/distiller_quality.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch


def parse_config(s: str) -> dict:
    out = {"lr": 4e-4, "warmup": 30, "rank": 64, "layers": 2, "source": 0}
    for part in s.split(","):
        k, v = part.split("=")
        out[k.strip()] = float(v) if k.strip() == "lr" else int(v)
    return out


@torch.no_grad()
def trajectories(model, prompt_ids, samples, sources=(0,)):
    """({source layer: x [L, H]}, t [L, H]) per sample sequence prompt + sample, from output_hidden_states
    (x: output of decoder layer `source`; t: the final norm's output, the LM-head input)."""
    out = []
    for ids in samples:
        seq = torch.tensor([list(prompt_ids) + list(ids)])
        hs = model(input_ids=seq, output_hidden_states=True, use_cache=False).hidden_states
        out.append(({s: hs[s + 1][0].float() for s in sources}, hs[-1][0].float()))
    return out


def replay(model, prompt_len, traj, cfg, *, windows, min_p=0.1, seed=0):
    import esamp
    from esamp import hf

    W = hf.find_lm_head(model).weight.float()
    H = W.shape[1]
    d = esamp.Distiller(H, rank=cfg["rank"], layers=cfg["layers"], slots=1, lr=cfg["lr"], seed=seed,
                        gamma_init=hf.find_final_norm(model))
    slot = torch.zeros(prompt_len, dtype=torch.long)
    src = cfg.get("source", 0)
    traj = [(xs[src], t) for xs, t in traj]
    xp, tp = traj[0][0][:prompt_len], traj[0][1][:prompt_len]
    for _ in range(cfg["warmup"]):
        d.train_step(xp, tp, slot)
    lens = [x.shape[0] - prompt_len for x, _ in traj]
    stats = {w: {"rel_err": [], "top1": [], "cand_sd": [], "cand_corr": []} for w in windows}
    for k in range(max(lens)):
        # the row of step k holds the token sampled at step k - 1 (k = 0: the last prompt position)
        rows = [j for j, L in enumerate(lens) if L > k]
        pos = prompt_len - 1 + k
        x = torch.stack([traj[j][0][pos] for j in rows])
        t = torch.stack([traj[j][1][pos] for j in rows])
        s = torch.zeros(len(rows), dtype=torch.long)
        t_hat = d.forward(x, s).float()
        w = next(w for w in windows if w[0] <= k < w[1]) if any(w[0] <= k < w[1] for w in windows) else None
        if w is not None:
            st = stats[w]
            st["rel_err"] += (((t - t_hat) ** 2).sum(1) / (t ** 2).sum(1)).tolist()
            lg, dg = t @ W.t(), t_hat @ W.t()
            st["top1"] += (lg.argmax(1) == dg.argmax(1)).float().tolist()
            keep = lg >= lg.max(1, keepdim=True).values + math.log(min_p)
            for r in range(len(rows)):
                c = keep[r].nonzero().squeeze(1)
                if c.numel() >= 2:
                    diff = (lg[r, c] - dg[r, c]).double()
                    st["cand_sd"].append(float(diff.std()))
                    lc = lg[r, c].double()
                    if float(lc.std()) > 0 and float(diff.std()) > 0:
                        st["cand_corr"].append(float(torch.corrcoef(torch.stack([diff, lc]))[0, 1]))
        d.train_step(x, t, s)
    return {f"{a}-{b}": {key: (sum(v) / len(v) if v else None) for key, v in st.items()} | {"rows": len(st["top1"])}
            for (a, b), st in stats.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", required=True, help="an eval chunk JSON (runs/*.json) or diag JSON with token_ids/texts")
    ap.add_argument("--problems", default="0", help="positions of the problems within that file (comma-separated)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--config", action="append", default=[], help="lr=..,warmup=..,rank=..,layers=.. (repeatable)")
    ap.add_argument("--windows", default="0-16,16-64,64-128,128-256,256-512")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from esamp import hf, models
    from esamp.eval import suites

    model, tok = models.load(args.model, cache=True)
    with open(args.samples) as f:
        data = json.load(f)
    windows = [tuple(int(v) for v in w.split("-")) for w in args.windows.split(",")]
    configs = [parse_config(c) for c in (args.config or ["lr=4e-4,warmup=30"])]
    suite = suites.get_suite("gsm8k", "all")
    res = {"model": args.model, "samples": args.samples, "configs": configs, "problems": {}, "mean": {}}
    for pi in (int(p) for p in args.problems.split(",")):
        if "token_ids" in data:
            samples = data["token_ids"][pi]
            index = data.get("indices", list(range(len(data["token_ids"]))))[pi]
        elif "texts" in data:
            # Caches written before token ids were stored: re-encode the decoded samples.  The re-encoded ids can
            # differ from the sampled ones where a text has several tokenisations, but they are a trajectory of
            # the same text, which is what the replay needs (the distiller sees these rows either way).
            samples = [tok(t, add_special_tokens=False)["input_ids"] for t in data["texts"][pi]]
            index = data.get("indices", list(range(len(data["texts"]))))[pi]
            res.setdefault("notes", []).append(f"problem {index}: token ids re-encoded from the stored texts")
        else:
            raise SystemExit(f"{args.samples}: neither token_ids nor texts")
        prompt = suite.prompts[index]
        prompt_ids = hf._encode(tok, [prompt], True)[0]
        t0 = time.perf_counter()
        traj = trajectories(model, prompt_ids, samples, sorted({c.get("source", 0) for c in configs}))
        print(f"problem {index}: {len(samples)} samples, trajectories in {time.perf_counter() - t0:.0f} s", flush=True)
        res["problems"][str(index)] = {}
        for cfg in configs:
            name = ",".join(f"{k}={v:g}" for k, v in cfg.items())
            r = replay(model, len(prompt_ids), traj, cfg, windows=windows)
            res["problems"][str(index)][name] = r
            print(f"  {name}: " + "; ".join(f"{w}: rel_err {v['rel_err']:.3f} top1 {v['top1']:.2f} "
                                           f"cand_sd {v['cand_sd'] or float('nan'):.2f} "
                                           f"corr {v['cand_corr'] or float('nan'):.2f}"
                                           for w, v in r.items() if v["rows"]), flush=True)
    for cfg in configs:
        name = ",".join(f"{k}={v:g}" for k, v in cfg.items())
        res["mean"][name] = {}
        for w in (f"{a}-{b}" for a, b in windows):
            vals = [res["problems"][p][name][w] for p in res["problems"] if res["problems"][p][name][w]["rows"]]
            res["mean"][name][w] = {k: (sum(v[k] for v in vals if v[k] is not None)
                                        / max(1, sum(1 for v in vals if v[k] is not None)))
                                    for k in ("rel_err", "top1", "cand_sd", "cand_corr")}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
