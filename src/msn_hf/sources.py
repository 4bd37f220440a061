"""Where models come from: a folder here or a Hub id, checked before a run creates anything."""

import os
from pathlib import Path


def source_name(value: str | None) -> str | None:
    """
    How weights a run started from are named where the name must keep its meaning elsewhere (a model card): a Hub
    id as given, a local folder or file by its absolute path. None stays None.
    """
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def looks_local(value: str) -> bool:
    """
    Whether `value` can only be a local path: it is written as one (begins with `.`, `/` or `~`, or holds a path
    separator) and is not a Hub id (`name` or `namespace/name`, see `huggingface_hub.utils.validate_repo_id`).
    `namespace/name` reads as both; it is a Hub id unless a folder of that name is here.
    """
    if not (value.startswith((".", "/", "~")) or "/" in value or os.sep in value):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return False


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
    if looks_local(value):
        raise ValueError(f"{flag} {value!r} was read as a local folder, but there is no folder at {path.absolute()}.")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id=value, filename="config.json")
    except Exception as error:  # offline, unknown repository, invalid id, gated: all mean "cannot load this id"
        reason = first_line(error)
        raise ValueError(
            f"{flag} {value!r} is not a folder here ({path.absolute()} does not exist), so it was read as a Hub "
            f"model id, which could not be loaded: {reason}"
        ) from error


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its class name when it has none): what a one-line error quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
