"""The `esamp` command line (also `python -m esamp`).

    esamp demo      [--model PATH|FILE.gguf] [-n 8] [--max-new-tokens 64] [--beta 0.25] [--out esamp_demo] ...
    esamp generate  --prompt TEXT [--prompt TEXT ...] [-n 16] [--beta 0.25] [--min-p 0.05] [--model PATH|FILE.gguf]
    esamp eval      diversity|passk ...

Every argument is checked before the model is loaded: a bad one gives one line on stderr,
`esamp <command>: error: --flag: expected ..., got ...`, and exit status 2.  A missing default model (or another
failure while running) gives one line and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _add_sampling(p: argparse.ArgumentParser, defaults: dict) -> None:
    d = defaults
    p.add_argument("--model", default=None, metavar="NAME|PATH|FILE.gguf",
                   help="a short name (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b: see `esamp eval`'s "
                        "assets), a local transformers folder or a GGUF file (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("-n", "--n", type=int, default=d["n"], help=f"samples per prompt (default {d['n']})")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"],
                   help=f"tokens to generate per sample (default {d['max_new_tokens']})")
    p.add_argument("--temperature", type=float, default=d["temperature"],
                   help=f"sampling temperature (0 = greedy; default {d['temperature']})")
    p.add_argument("--top-k", type=int, default=d["top_k"], help=f"top-k filter (0 = off; default {d['top_k']})")
    p.add_argument("--top-p", type=float, default=d["top_p"], help=f"top-p filter (1 = off; default {d['top_p']})")
    p.add_argument("--min-p", type=float, default=d["min_p"], help=f"min-p filter (0 = off; default {d['min_p']})")
    p.add_argument("--seed", type=int, default=d["seed"], help="sampling seed (per-row seeds are derived from it)")
    c = d["esamp"]
    p.add_argument("--beta", type=float, default=None, help=f"ESamp mixing strength (default {c.beta})")
    p.add_argument("--mode", choices=("per_prompt", "shared"), default=None,
                   help=f"distiller per prompt or shared (default {c.mode})")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"warm-start optimizer steps at prefill (default {c.warmup_steps})")
    p.add_argument("--lr", type=float, default=None, help=f"distiller learning rate (default {c.lr:g})")
    p.add_argument("--rank", type=int, default=None, help=f"distiller rank (default {c.effective_rank})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


_CONFIG_FLAGS = {"beta": "--beta", "mode": "--mode", "warmup_steps": "--warmup-steps", "lr": "--lr", "rank": "--rank"}
_SAMPLING_FLAGS = {"n": "-n", "max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
                   "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p", "seed": "--seed"}


class ArgumentError(ValueError):
    """A command-line argument is invalid (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `esamp demo: error: argument -n/--n: invalid int value`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _config(args, base):
    kw = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None}
    try:
        return base.replace(**kw)
    except ValueError as e:  # "ESampConfig.beta: expected ..." -> "--beta: expected ..."
        msg = str(e)
        for field, flag in _CONFIG_FLAGS.items():
            if msg.startswith(f"ESampConfig.{field}:"):
                raise ArgumentError(flag + msg[len(f"ESampConfig.{field}"):]) from None
        raise ArgumentError(msg) from None


def _check_model(path: Optional[str]) -> None:
    """--model must be a .gguf file or a folder holding config.json; the default model must be installed."""
    from .models import default_model_file, resolve

    if path is not None:
        path = resolve(path)              # short names (qwen2.5-coder-0.5b, ...): ModelNotInstalledError if missing
    if path is None:
        default_model_file()              # ModelNotInstalledError (exit status 1) with the install command
        return
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ArgumentError(f"--model: GGUF file not found: {path!r}")
        return
    if not os.path.isdir(path):
        raise ArgumentError(f"--model: expected a transformers model folder or a .gguf file, got {path!r} "
                            f"(no such file or folder)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ArgumentError(f"--model: {path!r} is not a model: expected a transformers model folder (with "
                            f"config.json) or a .gguf file")


def _check_out(path: str) -> None:
    """Creates the output folder now and checks that a file can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".esamp-write-check-"):
            pass
    except OSError as e:
        raise ArgumentError(f"--out: cannot write to {path!r} ({e.strerror or e})") from None


def check_args(args, base_config):
    """Validate every argument of `esamp demo` / `esamp generate` (no model is loaded).  Returns the ESamp config
    (None for --vanilla); raises ArgumentError naming the flag, or ModelNotInstalledError."""
    # The ranges esamp.hf.generate enforces (checked here without importing transformers, which esamp.hf does).
    checks = [("n", args.n >= 1, "an int >= 1"), ("max_new_tokens", args.max_new_tokens >= 1, "an int >= 1"),
              ("temperature", 0 <= args.temperature < math.inf, "a finite number >= 0"),
              ("top_p", 0 < args.top_p <= 1, "a number in (0, 1]"), ("min_p", 0 <= args.min_p < 1, "a number in [0, 1)")]
    for name, ok, expected in checks:
        if not ok:
            raise ArgumentError(f"{_SAMPLING_FLAGS[name]}: expected {expected}, got {getattr(args, name)!r}")
    for p in args.prompt or []:
        if not p.strip():
            raise ArgumentError(f"--prompt: expected non-empty text, got {p!r}")
    config = None if getattr(args, "vanilla", False) else _config(args, base_config)
    if args.command == "demo":
        if args.n < 2:
            raise ArgumentError(f"-n: the demo's diversity metrics compare the samples of a prompt, expected an int "
                                f">= 2, got {args.n}")
        if args.show < 0:
            raise ArgumentError(f"--show: expected an int >= 0, got {args.show}")
    _check_model(args.model)
    if args.command == "demo":
        _check_out(args.out)
    return config


def build_parser() -> argparse.ArgumentParser:
    from .config import ESampConfig
    from .demo import DEMO_SETTINGS

    ap = _Parser(prog="esamp", description="Exploratory Sampling (ESamp) for LLM decoding.")
    sub = ap.add_subparsers(dest="command", metavar="{demo,generate,eval}")
    sub.add_parser("eval", help="evaluation suite: `esamp eval diversity ...`, `esamp eval passk ...` "
                               "(see `esamp eval --help`)")
    d = sub.add_parser("demo", help="vanilla vs ESamp on the embedded model: samples, metrics table, plot")
    _add_sampling(d, DEMO_SETTINGS)
    d.add_argument("--prompt", action="append", default=None,
                   help="prompt (repeatable; default: the built-in creative prompts)")
    d.add_argument("--out", default="esamp_demo", help="output folder for results.json, samples.md and the plot "
                                                       "(created first)")
    d.add_argument("--show", type=int, default=3, help="samples per prompt shown side by side")
    d.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    g = sub.add_parser("generate", help="sample n continuations of prompts with ESamp (or --vanilla)")
    _add_sampling(g, {"n": 16, "max_new_tokens": 128, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                      "seed": 0, "esamp": ESampConfig()})
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    g.add_argument("--vanilla", action="store_true", help="plain sampling through the same loop (no ESamp)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap


def _cmd_generate(args, config) -> int:
    from . import hf, models

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


def _cmd_demo(args, config) -> int:
    from .demo import run_demo

    run_demo(model_path=args.model, prompts=args.prompt, n=args.n, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
             config=config, out_dir=args.out, show=args.show, progress=not args.no_progress,
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
    from .config import ESampConfig
    from .demo import DEMO_SETTINGS
    from .models import ModelNotInstalledError

    base = DEMO_SETTINGS["esamp"] if args.command == "demo" else ESampConfig()
    try:
        config = check_args(args, base)
    except ArgumentError as e:
        print(f"esamp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModelNotInstalledError as e:
        print(f"esamp {args.command}: error: {e}", file=sys.stderr)
        return 1
    import esamp

    esamp._load_core()   # the arguments are valid: now load torch and the extension (deferred by esamp_cli)
    try:
        return _cmd_demo(args, config) if args.command == "demo" else _cmd_generate(args, config)
    except (ModelNotInstalledError, FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"esamp {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
