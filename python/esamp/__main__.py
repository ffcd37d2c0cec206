"""`python -m esamp` = the `esamp` command line."""
import sys

from .cli import main

sys.exit(main())
