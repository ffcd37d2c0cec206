"""Entry point of the `esamp` console script.

`import esamp` loads torch (about 2.5 s on a small CPU machine) to register torch.ops.esamp.*.  The console script
first checks its arguments -- a bad one is reported in a fraction of a second, without torch -- and only then loads
the core: this module marks the import as deferred (DEFER_CORE), esamp/__init__.py reads the mark, and esamp.cli
calls esamp._load_core() once the arguments are valid.  `python -m esamp` and every other import load the core
eagerly, as before.
"""
import sys

DEFER_CORE = True


def main() -> int:
    from esamp.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
