"""
Files and folders a run writes, whole or not at all: each is written under a temporary name next to its final place
and renamed into it (a rename within one folder is atomic), so that a crash leaves the old file or the new one,
never half of one. What ends in place has the permissions a plain `open()` / `mkdir` would give under the user's
umask, not the owner-only ones of `tempfile` (colleagues on a shared server must be able to read a model).
"""

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_permissions(path: str | os.PathLike) -> None:
    """Set `path` (and, for a folder, everything in it) to the modes `open()` and `mkdir` give under the umask."""
    path, mask = Path(path), _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def folder_relation(folder: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """
    Where `folder` lies against `other`: "is" it, "holds" it, "is inside" it, or None when apart or when `other` is
    not a local path (a Hub id). Real paths are compared (links and `..` resolved): the checks that keep a run from
    writing over the weights it reads are phrased with it.
    """
    other = Path(other).expanduser()
    if not other.exists():
        return None
    other, folder = other.resolve(), Path(folder).expanduser().resolve()
    if folder == other:
        return "is"
    if folder in other.parents:
        return "holds"
    if other in folder.parents:
        return "is inside"
    return None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """
    Yield a temporary path in the folder of `path` (created if needed) for the block to write; it is renamed to
    `path` when the block succeeds and removed when it fails, so `path` is the old file or the complete new one.
    Writers that take the format from the name must be told it (the temporary name ends in `.tmp`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        give_default_permissions(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder, renamed into place; returns `path`."""
    with atomic_file(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def move_files_into(staging: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """
    Move every entry of the folder `staging` into `output_dir`, one rename each (replacing entries of the same name),
    then remove `staging`: each file in `output_dir` is either the old one or the complete new one.
    """
    staging, output_dir = Path(staging), Path(output_dir)
    give_default_permissions(staging)
    for path in staging.iterdir():
        target = output_dir / path.name
        if path.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    staging.rmdir()


def replace_folder(staging: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Rename the folder `staging` to `output_dir`, replacing what is there only once the new folder is in place."""
    staging, output_dir = Path(staging), Path(output_dir)
    give_default_permissions(staging)
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    # Moved aside rather than deleted first, so that a failed rename can put the old folder back.
    previous = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex}"
    os.replace(output_dir, previous)
    try:
        os.replace(staging, output_dir)
    except BaseException:
        os.replace(previous, output_dir)
        raise
    if previous.is_dir() and not previous.is_symlink():
        shutil.rmtree(previous)
    else:  # a file, or a link: the link goes, not what it points to
        previous.unlink()


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse (FileExistsError) an `output_dir` that exists and is not an empty folder, unless `overwrite`."""
    output_dir = Path(output_dir)
    occupied = output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass `overwrite=True` (`--overwrite`) to replace it.")


@contextlib.contextmanager
def atomic_folder(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """
    Yield a temporary folder next to `output_dir` and rename it to `output_dir` when the block succeeds; on any
    error it is deleted (with any parent folder this call created), so `output_dir` is complete or as it was.
    A non-empty `output_dir` is refused (FileExistsError) unless `overwrite`.
    """
    output_dir = Path(output_dir).absolute()
    check_output_dir(output_dir, overwrite)
    # The outermost folder this call creates, removed again on failure so that nothing at all is left behind.
    created = next((parent for parent in reversed(output_dir.parents) if not parent.exists()), None)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, same file system: the final rename is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        yield staging
        replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(created or staging, ignore_errors=True)
        raise
