"""Compare one method's pass@k across two `esamp eval passk --suite` results files, paired by problem.

For runs that cannot share one aggregation -- e.g. the same vanilla method with the model de-quantised to float32
in one run and to bfloat16 in another (the dtype is part of every cached chunk's key).  Only the problems both
files hold are compared; the difference B - A gets a paired bootstrap over problems (5-95 %), as `esamp eval
passk` reports ESamp - vanilla.  The two runs draw different samples (other numerics), so this is a comparison of
two samplers, not of the same samples.

  PYTHONPATH=python python bench/passk_compare.py A.json "vanilla T=1 min_p=0.1" B.json "vanilla T=1 min_p=0.1" \
      [--split 0-31] [--label-a float32 --label-b bfloat16] [--out OUT.json]   (--split: problem indices)
"""
from __future__ import annotations

import argparse
import json
import sys


def per_problem(path: str, method: str):
    with open(path) as f:
        res = json.load(f)
    runs = res["runs"]
    if method not in runs:
        raise SystemExit(f"method: {method!r} is not in {path} (it has: {', '.join(runs)})")
    return res["settings"], runs[method]["per_problem"], runs[method]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a_json")
    ap.add_argument("a_method")
    ap.add_argument("b_json")
    ap.add_argument("b_method")
    ap.add_argument("--split", default=None, help="only these problems (as `esamp eval passk --split` reads it)")
    ap.add_argument("--label-a", default="A")
    ap.add_argument("--label-b", default="B")
    ap.add_argument("--out", default=None, help="write the comparison as JSON")
    args = ap.parse_args(argv)
    from esamp.eval.suite_eval import bootstrap_diff

    sa, pa, ra = per_problem(args.a_json, args.a_method)
    sb, pb, rb = per_problem(args.b_json, args.b_method)
    if sa["suite"] != sb["suite"] or sa["n"] != sb["n"]:
        raise SystemExit(f"a_json, b_json: suite/n differ ({sa['suite']}, n {sa['n']} vs {sb['suite']}, n {sb['n']})")
    ks = [k for k in sa["ks"] if k in sb["ks"]]
    common = [p for p in sa["problems"] if p in pa and p in pb]
    if args.split is not None:
        from esamp.eval.suites import parse_split

        keep = set(parse_split(args.split, {}, 1 << 30))
        common = [p for p in common if int(p.rsplit("/", 1)[-1]) in keep]
    if not common:
        raise SystemExit("no problem is in both files" + (f" and in --split {args.split}" if args.split else ""))
    ia = [sa["ks"].index(k) for k in ks]
    ib = [sb["ks"].index(k) for k in ks]
    A = [[pa[p][i] for i in ia] for p in common]
    B = [[pb[p][i] for i in ib] for p in common]
    d = bootstrap_diff(B, A)
    mean = lambda M, j: sum(r[j] for r in M) / len(M)  # noqa: E731
    solved = lambda M: sum(1 for r in M if r[-1] > 0)  # noqa: E731
    print(f"{sa['suite']}, {len(common)} problems, n = {sa['n']}: {args.label_a} = {args.a_method} "
          f"({sa['dtype']}, {args.a_json}) vs {args.label_b} = {args.b_method} ({sb['dtype']}, {args.b_json})")
    print(f"| k | {args.label_a} | {args.label_b} | {args.label_b} - {args.label_a} | 5-95 % |")
    print("|---|---|---|---|---|")
    for j, k in enumerate(ks):
        print(f"| {k} | {mean(A, j):.3f} | {mean(B, j):.3f} | {d['mean'][j]:+.3f} | "
              f"[{d['lo'][j]:+.3f}, {d['hi'][j]:+.3f}] |")
    print(f"solved at k = {ks[-1]}: {solved(A)} vs {solved(B)} of {len(common)}; mean tokens "
          f"{ra.get('mean_tokens', float('nan')):.1f} vs {rb.get('mean_tokens', float('nan')):.1f}; tokens/s "
          f"{ra.get('tokens_per_s', float('nan')):.1f} vs {rb.get('tokens_per_s', float('nan')):.1f} (whole runs)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"a": {"json": args.a_json, "method": args.a_method, "dtype": sa["dtype"], "label": args.label_a},
                       "b": {"json": args.b_json, "method": args.b_method, "dtype": sb["dtype"], "label": args.label_b},
                       "problems": common, "ks": ks, "a_pass_at_k": [mean(A, j) for j in range(len(ks))],
                       "b_pass_at_k": [mean(B, j) for j in range(len(ks))], "b_minus_a": d,
                       "solved": [solved(A), solved(B)]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
