"""One-line errors for the command-line tools (train.py, eval.py, bench.py, npz_to_imagefolder.py).

A mistake in the command line or in the files it names raises UserError; run_cli ends the program with
one line on stderr, `error: ...`, and exit status 1, never a traceback. Argument errors found by argparse
keep argparse's usage line and exit status 2.
"""
import sys


class UserError(Exception):
    """A problem with the command line or the files it names: reported in one line, no traceback."""


def run_cli(main):
    """Run a command's main(): a UserError ends it with one line on stderr and exit status 1."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
