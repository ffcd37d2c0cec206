"""Metrics of cached `esamp eval diversity` runs side by side (one line per run file), for runs that have no
baseline frontier of their own seed.

    python bench/runs_table.py OUT/runs/esamp_*_s1_*.json
"""
import argparse
import json

KEYS = ("vendi", "ppl", "loop_rate", "tail_rate", "distinct_2", "within_distinct_2", "mean_tokens", "eos_rate")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run files (OUT/runs/*.json of esamp eval diversity)")
    a = p.parse_args(argv)
    print("| method | seed | " + " | ".join(KEYS) + " | samples in a loop |")
    print("|---|---|" + "---|" * (len(KEYS) + 1))
    for f in a.runs:
        r = json.load(open(f))
        m = r["metrics"]
        n = sum(len(g) for g in r["texts"])
        cells = [f"{m[k]:.4g}" if m.get(k) is not None else "n/a" for k in KEYS]
        print(f"| {r['method']['name']} | {r['seed']} | " + " | ".join(cells) + f" | {round(m['loop_rate'] * n)} of {n} |")


if __name__ == "__main__":
    main()
