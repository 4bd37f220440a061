"""
The console scripts `msn-pretrain`, `msn-evaluate` and `msn-convert`, with the behaviour of command-line tools:
exit status 0 on success; a user error (a bad value, an unknown override, a missing folder, an existing output)
prints one line `<tool>: error: <message>` and exits with 2, without a traceback unless `--debug` is given.
"""

import sys
from collections.abc import Callable, Sequence

# Errors that describe what the user asked for, not a defect: every message names the argument and the value.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)
DEBUG_FLAG = "--debug"


def run(main: Callable[[list[str]], object], prog: str, argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` as the tool `prog`; returns the exit status (0, or 2 for a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: error: {str(error).strip()} (rerun with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        return 2
    return 0


def pretrain() -> None:
    """`msn-pretrain`."""
    from .pretraining import main

    sys.exit(run(main, "msn-pretrain"))


def evaluate() -> None:
    """`msn-evaluate`."""
    from .evaluation import main

    sys.exit(run(main, "msn-evaluate"))


def convert() -> None:
    """`msn-convert`."""
    from .convert import main

    sys.exit(run(main, "msn-convert"))
