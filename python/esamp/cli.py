"""The `esamp` command line (also `python -m esamp`).

    esamp demo      [--model PATH|FILE.gguf] [-n 8] [--max-new-tokens 64] [--beta 0.25] [--out esamp_demo] ...
    esamp generate  --prompt TEXT [--prompt TEXT ...] [-n 16] [--beta 0.25] [--min-p 0.05] [--model PATH|FILE.gguf]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _add_sampling(p: argparse.ArgumentParser, *, n: int, max_new_tokens: int) -> None:
    p.add_argument("--model", default=None, metavar="PATH|FILE.gguf",
                   help="local transformers folder or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("-n", "--n", type=int, default=n, help=f"samples per prompt (default {n})")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens to generate per sample (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="top-k filter (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p filter (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per-row seeds are derived from it)")
    p.add_argument("--beta", type=float, default=None, help="ESamp mixing strength (default 0.25)")
    p.add_argument("--mode", choices=("per_prompt", "shared"), default=None, help="distiller per prompt or shared")
    p.add_argument("--warmup-steps", type=int, default=None, help="warm-start optimizer steps at prefill")
    p.add_argument("--lr", type=float, default=None, help="distiller learning rate")
    p.add_argument("--rank", type=int, default=None, help="distiller rank")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args):
    from .config import ESampConfig

    kw = {k: getattr(args, k) for k in ("beta", "mode", "warmup_steps", "lr", "rank") if getattr(args, k) is not None}
    return ESampConfig(**kw)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="esamp", description="Exploratory Sampling (ESamp) for LLM decoding.")
    sub = ap.add_subparsers(dest="command", metavar="{demo,generate,eval}")
    sub.add_parser("eval", help="evaluation suite: `esamp eval diversity ...`, `esamp eval passk ...` "
                               "(see `esamp eval --help`)")
    d = sub.add_parser("demo", help="vanilla vs ESamp on the embedded model: samples, metrics table, plot")
    _add_sampling(d, n=8, max_new_tokens=64)
    d.add_argument("--prompt", action="append", default=None,
                   help="prompt (repeatable; default: the built-in creative prompts)")
    d.add_argument("--out", default="esamp_demo", help="output folder for results.json, samples.md and the plot")
    d.add_argument("--show", type=int, default=3, help="samples per prompt shown side by side")
    d.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    g = sub.add_parser("generate", help="sample n continuations of prompts with ESamp (or --vanilla)")
    _add_sampling(g, n=16, max_new_tokens=128)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    g.add_argument("--vanilla", action="store_true", help="plain sampling through the same loop (no ESamp)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap


def _cmd_generate(args) -> int:
    from . import hf, models

    config = None if args.vanilla else _config(args)
    model, tok = models.load(args.model)
    out = hf.generate(model, tok, args.prompt, n=args.n, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                      seed=args.seed, esamp=config, chat=not args.no_chat, progress=not args.no_progress)
    stats = {k: v for k, v in out.stats.items() if k != "step_times"}
    if args.json:
        print(json.dumps({"texts": out.texts, "token_ids": out.token_ids, "stats": stats}))
        return 0
    for p, prompt in enumerate(args.prompt):
        print(f"=== prompt {p + 1}: {prompt}")
        for j, text in enumerate(out.texts[p]):
            print(f"--- sample {j + 1}")
            print(text)
    s = out.stats
    line = (f"[{s['method']}] {s['rows']} rows, {s['generated_tokens']} tokens in "
            f"{s['prefill_s'] + s['decode_s']:.2f} s ({s['tokens_per_s']:.1f} tokens/s)")
    if "trainer" in s:
        line += f"; distiller rows trained {s['trainer']['rows_trained']}, skipped {s['trainer']['rows_skipped']}"
    print(line, file=sys.stderr)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(model_path=args.model, prompts=args.prompt, n=args.n, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
             config=_config(args), out_dir=args.out, show=args.show, progress=not args.no_progress,
             plot=not args.no_plot)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":  # `esamp eval diversity|passk ...` has its own parser
        from .eval.cli import main as eval_main

        return eval_main(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    from .models import ModelNotInstalledError

    try:
        return _cmd_demo(args) if args.command == "demo" else _cmd_generate(args)
    except (ModelNotInstalledError, FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"esamp {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
