"""
The console scripts `msn-pretrain`, `msn-evaluate` and `msn-convert`, with the behaviour of command-line tools:
exit status 0 on success; a user error (a bad value, an unknown override, a missing folder, an existing output)
prints one line `<tool>: error: <message>` and exits with 2, without a traceback unless `--debug` is given.
"""

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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


def check_model_source(value: str, flag: str = "--model_name_or_path") -> None:
    """
    Raise a `ValueError` naming `value` and how it was read when it is neither a model folder here nor a Hub model
    id that can be loaded: a folder without `config.json`, a path to nothing, or a Hub id the Hub does not serve
    (or that cannot be fetched offline).
    """
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{flag} {value!r} was read as a local folder, but it holds no config.json: not a saved model.")
        return
    if path.exists():
        raise ValueError(f"{flag} {value!r} is a file; expected a model folder or a Hub model id.")
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)
    if looks_local:
        raise ValueError(f"{flag} {value!r} was read as a local folder, but there is no folder at {path.absolute()}.")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id=value, filename="config.json")
    except Exception as error:  # offline, unknown repository, invalid id, gated: all mean "cannot load this id"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{flag} {value!r} is not a folder here ({path.absolute()} does not exist), so it was read as a Hub "
            f"model id, which could not be loaded: {reason}"
        ) from error


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
