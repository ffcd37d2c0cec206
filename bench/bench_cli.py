"""How fast the `esamp` command reports a bad argument: the console script's entry (esamp_cli, which checks the
arguments before torch loads) against `python -m esamp` (which imports esamp, hence torch, first) and a bare
`python -c "import torch"` (the floor of anything that loads torch).  Fresh processes, the three interleaved,
median wall time of --repeats each.

    python bench/bench_cli.py [--repeats 7] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = ["demo", "-n", "-1"]
CASES = {
    "esamp (console script: esamp_cli)": [sys.executable, "-c",
                                          "import sys, esamp_cli; sys.argv = ['esamp'] + sys.argv[1:]; "
                                          "sys.exit(esamp_cli.main())"] + BAD,
    "python -m esamp": [sys.executable, "-m", "esamp"] + BAD,
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    env = dict(os.environ)
    if os.path.exists(os.path.join(ROOT, "python", "esamp", "_C.so")):   # a development build: this checkout
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python")] + ([env["PYTHONPATH"]]
                                                                              if env.get("PYTHONPATH") else []))
    times = {k: [] for k in CASES}
    for _ in range(args.repeats):
        for name, cmd in CASES.items():
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            times[name].append(time.perf_counter() - t0)
            if name != "python -c 'import torch'" and (r.returncode != 2 or "error: -n" not in r.stderr):
                print(f"{name}: expected exit status 2 and the -n error, got {r.returncode}: {r.stderr!r}")
                return 1
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"bad argument ({' '.join(BAD)}), median of {args.repeats} fresh processes each, interleaved")
    print(f"{'command':40s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for k, v in times.items():
        print(f"{k:40s} {med[k]:9.3f} {min(v):7.3f} {max(v):7.3f}")
    first = next(iter(med))
    print(f"python -m esamp / console script: {med['python -m esamp'] / med[first]:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": BAD, "repeats": args.repeats, "seconds": times, "median_s": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
