"""`esamp eval ...`: the evaluation commands (wired into the `esamp` console script as its `eval` sub-command).

    esamp eval diversity [--prompts FILE.jsonl] [--model PATH|FILE.gguf] [-n 16] [--max-new-tokens 64]
                         [--temperatures 0.7,0.85,1,1.15,1.3] [--baselines vanilla,min_p] [--min-p 0.05]
                         [--beta 0.1,0.25,0.5] [--lr 4e-4] [--warmup-steps 30] [--exempt none,mass]
                         [--point beta=0.25,lr=1e-3,warmup=100,exempt=mass] [--seeds 0,1] [--out DIR]
    esamp eval passk     [--tasks FILE.jsonl] [--model ...] [-n 16] [--max-new-tokens 48] [--temperature 0.7]
                         [--beta 0.25] [--lr 4e-4] [--warmup-steps 30] [--exempt none] [--seeds 0] [--out DIR]

Both print a markdown table, write results.json, results.md and PNG plots into --out, and show progress bars.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _floats(s: str) -> List[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {s!r}") from None


def _ints(s: str) -> List[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {s!r}") from None


def _names(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _exempt(s: str) -> List[Optional[str]]:
    out: List[Optional[str]] = []
    for x in _names(s):
        if x not in ("none", "mass", "logit", "recent", "repeat"):
            raise argparse.ArgumentTypeError(f"expected entries none, mass, logit, recent or repeat, got {x!r}")
        out.append(None if x == "none" else x)
    return out


def _point(s: str) -> dict:
    d: dict = {}
    for part in _names(s):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected key=value pairs (beta, lr, warmup, exempt, temperature, "
                                             f"min_p, rank, layers, mode, explore, gate), got {part!r}")
        k, v = (x.strip() for x in part.split("=", 1))
        if k in ("warmup", "rank", "layers", "explore"):
            d[k] = int(v)
        elif k == "exempt":
            d[k] = _exempt(v)[0]
        elif k == "mode":
            d[k] = None if v == "none" else v
        else:
            d[k] = float(v)
    return d


_DTYPE_HELP = ("dtype the model is de-quantised to: auto (default) = bfloat16 on CPUs with AVX-512 BF16 or AMX "
               "(2.3x faster than float32 there, same pass@k: docs/evaluation.md), else float32 (bf16 is emulated "
               "and slower without them)")


def _common(p: argparse.ArgumentParser, *, n: int, max_new_tokens: int, seeds: str) -> None:
    p.add_argument("--model", default=None, metavar="PATH|FILE.gguf",
                   help="local transformers folder or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("-n", "--n", type=int, default=n, help=f"samples per prompt (default {n})")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"default {max_new_tokens}" if max_new_tokens else "default: 48, or the suite's own budget")
    p.add_argument("--seeds", type=_ints, default=_ints(seeds), help=f"comma-separated seeds (default {seeds})")
    p.add_argument("--beta", type=_floats, default=None, help="ESamp beta values, comma-separated")
    p.add_argument("--lr", type=_floats, default=None, help="ESamp learning rates, comma-separated")
    p.add_argument("--warmup-steps", type=_ints, default=None, help="ESamp warm-up steps, comma-separated")
    p.add_argument("--rank", type=int, default=None, help="distiller rank (default: ESampConfig's)")
    p.add_argument("--exempt", type=_exempt, default=[None],
                   help="exemption variants of every ESamp point: none, mass, logit (special tokens keep their base "
                        "probability), recent (mass over the special tokens and each row's last 16 generated "
                        "tokens: ESamp cannot raise the chance of a repeat), repeat (mass over the special tokens "
                        "and only the tokens that would extend a repetition of the row's last 32 tokens) "
                        "(comma-separated; default none)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (0: leave the default); 1 is much faster on an oversubscribed machine")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="esamp eval", description="Evaluate ESamp against vanilla sampling.")
    sub = ap.add_subparsers(dest="command", metavar="{diversity,passk}")
    d = sub.add_parser("diversity", help="diversity / quality frontier: baselines' T sweeps vs ESamp points")
    _common(d, n=16, max_new_tokens=64, seeds="0,1")
    d.add_argument("--prompts", default=None,
                   help="JSON-lines prompt file, or 'mtbench' for the 20 MT-bench writing + roleplay questions "
                        "(assets: bash tools/install_eval_assets.sh); default: the shipped prompt set")
    d.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help=_DTYPE_HELP)
    d.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    d.add_argument("--baselines", type=_names, default=["vanilla", "min_p"],
                   help="baseline families: vanilla (temperature sweep), min_p (temperature sweep with --min-p)")
    d.add_argument("--temperatures", type=_floats, default=[0.7, 0.85, 1.0, 1.15, 1.3],
                   help="temperatures of the vanilla sweep (default 0.7,0.85,1,1.15,1.3)")
    d.add_argument("--min-p", type=float, default=0.05, help="min-p of the min_p baseline (default 0.05)")
    d.add_argument("--min-p-temperatures", type=_floats, default=None,
                   help="temperatures of the min_p sweep (default: --temperatures)")
    d.add_argument("--esamp-temperature", type=float, default=1.0, help="temperature of the ESamp grid (default 1)")
    d.add_argument("--esamp-min-p", type=float, default=0.0, help="min-p of the ESamp grid (default 0: off)")
    d.add_argument("--point", type=_point, action="append", default=[],
                   help="an extra ESamp point, e.g. beta=0.25,lr=1e-3,warmup=100,exempt=mass (repeatable)")
    d.add_argument("--positions", type=_ints, default=None, help="token positions of the similarity curve")
    d.add_argument("--fresh", action="store_true", help="ignore cached runs in OUT/runs")
    p = sub.add_parser("passk", help="pass@k (unbiased estimator) on tasks with checkers, vanilla vs ESamp")
    _common(p, n=16, max_new_tokens=None, seeds="0")
    p.add_argument("--tasks", default=None, help="JSON-lines task file (default: the shipped task set)")
    p.add_argument("--suite", default=None, choices=["gsm8k", "humaneval", "math500", "aime"],
                   help="a real benchmark suite instead of --tasks (assets: bash tools/install_eval_assets.sh)")
    p.add_argument("--split", default="dev",
                   help="problems of the suite: dev | heldout | all | a-b | a,b,c (gsm8k: dev = files 0000-0049, "
                        "heldout = 0050-0099, run once at the end; humaneval: dev = all)")
    p.add_argument("--temperature", type=_floats, default=None,
                   help="sampling temperature(s) of every method (default 0.7; with --suite: 1)")
    p.add_argument("--min-p", type=_floats, default=None,
                   help="min-p filter(s) of every method (default 0: off; with --suite: 0.1, the paper's protocol)")
    p.add_argument("--no-esamp-grid", action="store_true",
                   help="no ESamp grid over --temperature x --min-p x --beta x --lr x --warmup-steps (only --point)")
    p.add_argument("--no-vanilla-grid", action="store_true", help="no vanilla runs over --temperature x --min-p")
    p.add_argument("--point", type=_point, action="append", default=[],
                   help="an extra ESamp point, e.g. beta=0.25,lr=1e-3,warmup=100,temperature=1,min_p=0.1")
    p.add_argument("--vanilla-point", type=_point, action="append", default=[],
                   help="an extra vanilla point, e.g. temperature=0.8,min_p=0.05 (repeatable)")
    p.add_argument("--baseline", default=None, help="method name the differences are taken against (default: the "
                                                     "first vanilla method)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help=_DTYPE_HELP)
    p.add_argument("--batch-rows", type=int, default=256, help="rows (problems x n) decoded together (default 256)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the chunks (each with --threads 1); the parent aggregates")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-aggregate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fresh", action="store_true", help="ignore cached runs in OUT/runs")
    return ap


def _base_config(args):
    from ..config import ESampConfig

    return ESampConfig() if args.rank is None else ESampConfig(rank=args.rank)


def _load(args, log):
    from .. import models

    t0 = time.perf_counter()
    log("loading the model" + (f" {args.model}" if args.model else " SmolLM2-135M-Instruct (embedded)") + " ...")
    model, tok = models.load(args.model, dtype=getattr(args, "dtype", "float32"), cache=True)
    log(f"  loaded {type(model).__name__} in {time.perf_counter() - t0:.1f} s")
    return model, tok


def _cmd_diversity(args, log) -> int:
    from . import diversity, frontier

    base = _base_config(args)
    if args.prompts == "mtbench":
        from . import assets

        prompts = assets.mtbench_prompts()[: args.max_prompts] if args.max_prompts else assets.mtbench_prompts()
    else:
        prompts = diversity.load_prompts(args.prompts or diversity.BUILTIN_PROMPTS, args.max_prompts)
    methods = diversity.build_methods(
        temperatures=args.temperatures, baselines=args.baselines, min_p=args.min_p,
        min_p_temperatures=args.min_p_temperatures, betas=args.beta or [0.1, 0.25, 0.5], lrs=args.lr or [base.lr],
        warmups=args.warmup_steps or [base.warmup_steps], esamp_temperature=args.esamp_temperature,
        esamp_min_p=args.esamp_min_p, exempt=args.exempt, base_config=base, extra=args.point)
    out = args.out or "esamp_eval_diversity"
    log(f"esamp eval diversity: {len(prompts)} prompts x n = {args.n}, {args.max_new_tokens} new tokens, "
        f"{len(methods)} methods x {len(args.seeds)} seeds = {len(methods) * len(args.seeds)} runs -> {out}/")
    model, tok = _load(args, log)
    res = diversity.run_diversity(model, tok, prompts, methods, n=args.n, max_new_tokens=args.max_new_tokens,
                                  seeds=args.seeds, out_dir=out, chat=not args.no_chat, positions=args.positions,
                                  resume=not args.fresh, progress=not args.no_progress,
                                  model_name=args.model or "SmolLM2-135M-Instruct (embedded Q4_1 GGUF)", log=log)
    md = frontier.render_markdown(res)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    log("\n" + md)
    if not args.no_plots:
        for p in frontier.write_plots(res, out):
            log(f"wrote {p}")
    return 0


def _suite_methods(args, base):
    from .diversity import Method, esamp_method

    Ts = args.temperature if args.temperature is not None else [1.0]
    mps = args.min_p if args.min_p is not None else [0.1]
    methods = []

    def vname(T, mp):
        return f"vanilla T={T:g}" + (f" min_p={mp:g}" if mp > 0 else "")

    if not args.no_vanilla_grid:
        for T in Ts:
            for mp in mps:
                methods.append(Method(vname(T, mp), "min_p" if mp > 0 else "vanilla", temperature=T, min_p=mp))
    for v in args.vanilla_point:
        unknown = set(v) - {"temperature", "min_p"}
        if unknown:
            raise ValueError(f"--vanilla-point: unknown keys {sorted(unknown)} (expected temperature, min_p)")
        T, mp = float(v.get("temperature", 1.0)), float(v.get("min_p", 0.0))
        methods.append(Method(vname(T, mp), "min_p" if mp > 0 else "vanilla", temperature=T, min_p=mp))
    if not args.no_esamp_grid:
        for T in Ts:
            for mp in mps:
                for beta in args.beta or [base.beta]:
                    for lr in args.lr or [base.lr]:
                        for wu in args.warmup_steps or [base.warmup_steps]:
                            for ex in args.exempt:
                                methods.append(esamp_method(base.replace(beta=beta, lr=lr, warmup_steps=wu),
                                                            temperature=T, min_p=mp, exempt=ex))
    for e in args.point:
        unknown = set(e) - {"beta", "lr", "warmup", "exempt", "temperature", "min_p", "rank", "layers", "mode",
                            "explore", "gate"}
        if unknown:
            raise ValueError(f"--point: unknown keys {sorted(unknown)}")
        kw = {"beta": e.get("beta", base.beta), "lr": e.get("lr", base.lr),
              "warmup_steps": int(e.get("warmup", base.warmup_steps))}
        for k in ("rank", "layers", "mode"):
            if k in e:
                kw[k] = e[k]
        if "explore" in e:
            kw["explore_tokens"] = int(e["explore"])
        if "gate" in e:
            kw["gate_rel_err"] = float(e["gate"])
        methods.append(esamp_method(base.replace(**kw), temperature=float(e.get("temperature", Ts[0])),
                                    min_p=float(e.get("min_p", mps[0])), exempt=e.get("exempt") or None))
    names = [m.name for m in methods]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise ValueError(f"methods: duplicate method names {dup}")
    if not methods:
        raise ValueError("no methods: give --temperature/--min-p grids or --point/--vanilla-point")
    return methods


def _cmd_suite(args, log) -> int:
    import subprocess

    from . import suite_eval, suites

    base = _base_config(args)
    methods = _suite_methods(args, base)
    if args.batch_rows < 1:
        raise ValueError(f"--batch-rows: expected an int >= 1, got {args.batch_rows}")
    if args.workers < 1:
        raise ValueError(f"--workers: expected an int >= 1, got {args.workers}")
    out = args.out or f"esamp_eval_{args.suite}"
    os.makedirs(out, exist_ok=True)
    model_name = args.model or "smollm2-135m"
    if args.workers > 1 and args.shard is None:
        import shlex

        argv = [a for a in sys.argv[1:]]
        # re-run this command in W children, one shard each, then aggregate here
        i = argv.index("--workers")
        del argv[i:i + 2]
        procs = []
        log(f"esamp eval passk --suite {args.suite}: {len(methods)} methods x {len(args.seeds)} seeds, "
            f"{args.workers} workers -> {out}/")
        for w in range(args.workers):
            cmd = [sys.executable, "-m", "esamp"] + argv + ["--shard", f"{w}/{args.workers}", "--threads", "1",
                                                              "--dtype", args.dtype, "--no-aggregate"]
            if w > 0 and "--no-progress" not in cmd:
                cmd.append("--no-progress")
            log(f"  worker {w}: {' '.join(shlex.quote(c) for c in cmd)}")
            procs.append(subprocess.Popen(cmd))
        rcs = [p.wait() for p in procs]
        if any(rcs):
            log(f"esamp eval passk: workers exited with {rcs}")
            return 1
    else:
        from .. import models

        t0 = time.perf_counter()
        log(f"loading {model_name} ({args.dtype}) ...")
        model, tok = models.load(args.model, dtype=args.dtype, cache=True)
        log(f"  loaded {type(model).__name__} in {time.perf_counter() - t0:.1f} s")
        suite = suites.get_suite(args.suite, args.split, tokenizer=tok)
        shard = None
        if args.shard is not None:
            a, b = (int(x) for x in args.shard.split("/"))
            shard = (a, b)
        log(f"{suite.description}: {len(methods)} methods x {len(args.seeds)} seeds, n = {args.n}"
            + (f", shard {args.shard}" if shard else ""))
        suite_eval.run_suite(model, tok, suite, methods, n=args.n, max_new_tokens=args.max_new_tokens, seeds=args.seeds,
                             out_dir=out, batch_rows=args.batch_rows, shard=shard, model_name=model_name,
                             dtype=args.dtype, progress=not args.no_progress, resume=not args.fresh, log=log)
        if args.no_aggregate:
            return 0
        del model
    return _aggregate_suite(args, methods, out, log)


def _aggregate_suite(args, methods, out, log) -> int:
    from . import suite_eval, suites

    tok = _tokenizer_only(args)
    suite = suites.get_suite(args.suite, args.split, tokenizer=tok)
    res = suite_eval.aggregate(out, suite, methods, n=args.n, max_new_tokens=args.max_new_tokens, seeds=args.seeds,
                               model_name=args.model or "smollm2-135m", dtype=args.dtype,
                               batch_rows=args.batch_rows, baseline=args.baseline, tokenizer=tok)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = suite_eval.render_markdown(res)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    log("\n" + md)
    if not args.no_plots and suite_eval.write_plot(res, os.path.join(out, "passk.png")):
        log(f"wrote {out}/passk.png")
    return 0


def _tokenizer_only(args):
    from transformers import AutoTokenizer

    from .. import models

    path = models.resolve(args.model)
    if path is None:
        folder, name = models.default_model_file()
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _cmd_passk(args, log) -> int:
    from . import passk
    from .diversity import Method, esamp_method

    if args.suite is not None:
        return _cmd_suite(args, log)
    if args.temperature is None:
        args.temperature = [0.7]
    if args.min_p is None:
        args.min_p = [0.0]
    if len(args.min_p) != 1:
        raise ValueError("--min-p: a task-file evaluation takes one min-p value (grids need --suite)")
    args.min_p = args.min_p[0]
    if args.max_new_tokens is None:
        args.max_new_tokens = 48
    base = _base_config(args)
    tasks = passk.load_tasks(args.tasks or passk.BUILTIN_TASKS)
    methods = []
    for T in args.temperature:
        fam = "min_p" if args.min_p > 0 else "vanilla"
        methods.append(Method(f"vanilla T={T:g}" + (f" min_p={args.min_p:g}" if args.min_p > 0 else ""), fam,
                              temperature=T, min_p=args.min_p))
        for beta in args.beta or [base.beta]:
            for lr in args.lr or [base.lr]:
                for wu in args.warmup_steps or [base.warmup_steps]:
                    for ex in args.exempt:
                        methods.append(esamp_method(base.replace(beta=beta, lr=lr, warmup_steps=wu), temperature=T,
                                                    min_p=args.min_p, exempt=ex))
    out = args.out or "esamp_eval_passk"
    os.makedirs(out, exist_ok=True)
    log(f"esamp eval passk: {len(tasks)} tasks x n = {args.n}, {args.max_new_tokens} new tokens, {len(methods)} "
        f"methods x {len(args.seeds)} seeds -> {out}/")
    model, tok = _load(args, log)
    t0 = time.perf_counter()
    res = passk.run_passk(model, tok, tasks, methods, n=args.n, max_new_tokens=args.max_new_tokens, seeds=args.seeds,
                          chat=not args.no_chat, progress=not args.no_progress,
                          cache_dir=None if args.fresh else os.path.join(out, "runs"))
    res["settings"]["model"] = args.model or "SmolLM2-135M-Instruct (embedded Q4_1 GGUF)"
    res["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = passk.render_passk_markdown(res)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    log("\n" + md)
    if not args.no_plots and passk.write_passk_plot(res, os.path.join(out, "passk.png")):
        log(f"wrote {out}/passk.png")
    return 0


def main(argv: Optional[List[str]] = None, log=None) -> int:
    """Entry point of `esamp eval ...` (argv without the leading "eval")."""
    log = log or (lambda s: print(s, flush=True))
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    if args.n < 2 and args.command == "diversity":
        ap.error(f"-n: expected >= 2 samples per prompt for pairwise metrics, got {args.n}")
    if args.n < 1:
        ap.error(f"-n: expected >= 1, got {args.n}")
    from ..models import ModelNotInstalledError, resolve_dtype
    import esamp

    args.dtype, why = resolve_dtype(args.dtype)
    if getattr(args, "shard", None) is None:              # workers inherit the parent's choice (below)
        log(f"model dtype: {args.dtype} ({why})")

    esamp._load_core()   # deferred by the console script (esamp_cli) until the arguments parsed
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    try:
        return _cmd_diversity(args, log) if args.command == "diversity" else _cmd_passk(args, log)
    except (ModelNotInstalledError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"esamp eval {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
