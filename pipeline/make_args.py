"""The Makefile's way into edgeship: its own arguments, then the words of ARGS, never through a shell.

The Makefile hands every variable over in the environment (EDGESHIP_TARGET, ...) and passes each one as a
single argument; ARGS is the one that means several words. It arrives here untouched in EDGESHIP_ARGS and
is split with :func:`shlex.split`, the way a POSIX shell splits words (quotes, backslashes), but nothing in
it is expanded or run: ``$(...)``, backticks, ``;`` and globs stay literal text.

    python -m pipeline.make_args deploy --target=rpi       # edgeship deploy --target=rpi <ARGS words>
    python -m pipeline.make_args -m pytest -q              # python -m pytest -q <ARGS words>
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence

ENV = "EDGESHIP_ARGS"
USAGE_EXIT = 2


class ArgsError(ValueError):
    """ARGS cannot be split into words (an unbalanced quote, a trailing backslash)."""


def args_words(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The words of ARGS (from ``EDGESHIP_ARGS``), split like a POSIX shell would split them, run nothing."""
    text = environ.get(ENV, "")
    try:
        return shlex.split(text, comments=False, posix=True)
    except ValueError as exc:
        shown = text if len(text) <= 200 else text[:200] + "..."
        raise ArgsError(
            f"ARGS cannot be split into words ({str(exc).lower()}): ARGS={shown!r}; "
            "quote it as you would in a shell, e.g. ARGS=\"--data 'my images'\""
        ) from None


def build_argv(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """``argv`` (this module's own arguments) followed by the words of ARGS."""
    return [*argv, *args_words(environ)]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        full = build_argv(argv)
    except ArgsError as exc:
        print(f"edgeship: error: {exc}", file=sys.stderr)
        return USAGE_EXIT
    if len(argv) >= 2 and argv[0] == "-m":  # another module (pytest, pipeline.baseline): same interpreter
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", *full[1:]])
    from pipeline.cli import main as cli_main

    return cli_main(full)


if __name__ == "__main__":
    sys.exit(main())
