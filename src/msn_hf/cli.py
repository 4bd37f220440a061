"""
The console scripts `msn-pretrain`, `msn-evaluate` and `msn-convert`, with the behaviour of command-line tools:
exit status 0 on success; a user error (a bad value, an unknown override, a missing folder, an existing output)
prints one line `<tool>: error: <message>` and exits with 2, without a traceback unless `--debug` is given. An error
that carries its own `exit_code` (a failed upload after the run) prints one line and exits with that code; a run
stopped by Ctrl-C or SIGTERM exits with 130 or 143, as shells report a process the signal ended.
"""

import sys
from collections.abc import Callable, Sequence

# Errors that describe what the user asked for, not a defect: every message names the argument and the value.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)
DEBUG_FLAG = "--debug"
# The shell's status of a process ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_CODE = 130


def run(main: Callable[[list[str]], object], prog: str, argv: Sequence[str] | None = None) -> int:
    """
    Run `main(argv)` as the tool `prog`; returns the exit status: 0, 2 for a user error, an error's own `exit_code`,
    or 130 / 143 for a run stopped by a signal.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        main(argv)
    except KeyboardInterrupt as error:
        if debug:
            raise
        # A run stopped at a checkpoint has said where (and carries its status); a Ctrl-C elsewhere has not.
        if not hasattr(error, "exit_code"):
            print(f"{prog}: interrupted", file=sys.stderr)
        return getattr(error, "exit_code", INTERRUPTED_EXIT_CODE)
    except Exception as error:
        exit_code = 2 if isinstance(error, USER_ERRORS) else getattr(error, "exit_code", None)
        if debug or exit_code is None:
            raise
        print(f"{prog}: error: {str(error).strip()} (rerun with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        return exit_code
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
