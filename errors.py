"""One-line errors for the command-line tools (train.py, eval.py, bench.py, npz_to_imagefolder.py).

A mistake in the command line or in the files it names raises UserError; run_cli ends the program with
one line on stderr, `error: ...`, and exit status 1, never a traceback. Argument errors found by argparse
(ArgumentParser) are one line too, `PROG: error: ... (see PROG --help)`, with argparse's exit status 2.
"""
import argparse
import sys


class UserError(Exception):
    """A problem with the command line or the files it names: reported in one line, no traceback."""


def run_cli(main):
    """Run a command's main(): a UserError ends it with one line on stderr and exit status 1."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line that points to --help, instead of the whole usage first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
