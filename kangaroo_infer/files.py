"""Writing without losing anything: every file and directory kangaroo writes appears whole or not at all, and
never replaces a file it did not write.

``atomic_directory`` fills a directory beside its target and renames it into place; ``atomic_file`` /
``atomic_write`` do the same for one file. ``write_file`` adds the policy: a file is written only if it is new,
listed as this tool's own in its folder's ``.kangaroo-written``, or ``overwrite`` is given; ``claim_directory``
marks a folder filled piece by piece (a cache, distilled data) as one tool's own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WRITTEN_LIST = ".kangaroo-written"  # in every directory atomic_directory writes: the files it wrote, one a line


class UnwritableError(ValueError):
    """A writer could not create its output (or the temporary beside it): the message names the path and the fix."""


def _unwritable(path: str | os.PathLike, why: str | OSError) -> UnwritableError:
    return UnwritableError(f"Cannot write {path}: {why}. Choose a writable location for it.")


def check_writable(path: Path) -> None:
    """Refuse ``path`` when its nearest existing folder is not a directory this process may write into (a file, a
    read-only mount): part of the checks callers run before any work, so a long run never ends unable to save."""
    ancestor = Path(os.path.abspath(path)).parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise _unwritable(path, f"{ancestor} is not a writable directory")


def check_replaceable(target: Path, legacy_files: frozenset[str] = frozenset()) -> None:
    """Refuse to replace anything but an empty directory or one this tool wrote itself.

    A directory counts as ours when every file and folder in it is listed in its ``WRITTEN_LIST`` (or, for outputs
    written before that list existed, when it holds only ``legacy_files``). Anything else (a training run, a user's
    folder, a file) is refused with the path and the fix, never deleted.
    """
    check_writable(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; choose another output path (or remove the file).")
    entries = {str(p.relative_to(target)) for p in target.rglob("*")}
    listed = target / WRITTEN_LIST
    if listed.is_file():
        # only atomic_directory's own lines (no owner): files of single-file writers never make a directory replaceable
        written = {name for name, owner in _written_lines(target).items() if not owner} | {WRITTEN_LIST}
        parents = {str(parent) for name in written for parent in Path(name).parents if str(parent) != "."}
        foreign = sorted(entries - written - parents)
    else:
        foreign = sorted(entries - legacy_files)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"{target} already exists and holds files this tool did not write ({shown}); nothing was changed. "
            f"Choose another output directory, or empty {target} yourself if its contents may go."
        )


@contextmanager
def atomic_directory(target: Path, legacy_files: frozenset[str] = frozenset()) -> Iterator[Path]:
    """A temporary directory beside ``target`` that replaces it in one rename when the block succeeds.

    Readers never see a half-written directory, and an interrupted writer leaves ``target`` as it was. Only an
    empty directory or one this helper wrote before is replaced (``check_replaceable``), checked before and after the
    block, so a foreign directory is never deleted.
    """
    target = Path(target)
    check_replaceable(target, legacy_files)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as error:
        raise _unwritable(target, error) from None
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is meant to be shared
    try:
        yield tmp
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.is_dir())
        (tmp / WRITTEN_LIST).write_text("".join(f"{name}\n" for name in written))
        check_replaceable(target, legacy_files)  # it may have changed while the block ran
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _written_lines(directory: Path) -> dict[str, str]:
    """name -> owner of each line in ``directory``'s ``WRITTEN_LIST`` ("" for files atomic_directory wrote)."""
    try:
        lines = (directory / WRITTEN_LIST).read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return {}
    return dict((line.split("\t", 1) + [""])[:2] for line in lines if line)


def _record_written(directory: Path, name: str, owner: str) -> None:
    """Add ``name`` to the directory's written list (one appended line: ranks writing at once lose nothing)."""
    if _written_lines(directory).get(name) != owner:
        with open(directory / WRITTEN_LIST, "a", encoding="utf-8") as f:
            f.write(f"{name}\t{owner}\n")


def check_file_target(
    path: str | os.PathLike, owner: str, *, overwrite: bool = False, inputs: tuple = (), fix: str = ""
) -> Path:
    """Refuse to write ``path`` unless it is new, or a file ``owner`` wrote there before, or ``overwrite`` allows
    replacing a foreign file. A directory, or a file the same command reads (``inputs``), is always refused.

    Call it before any work, so a refused path costs nothing; ``write_file`` checks again. ``fix`` names the flag
    that allows replacing (e.g. "pass --overwrite to replace it").
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; name a file to write (e.g. {path / 'results.json'}).")
    check_writable(path)
    for source in inputs:
        if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
            raise ValueError(f"{path} is also an input of this command ({source}); nothing was changed. Name "
                             f"another output file.")  # fmt: skip
    if path.exists() and not overwrite and _written_lines(path.parent).get(path.name) != owner:
        raise ValueError(
            f"{path} exists and {owner} did not write it; nothing was changed. Choose another output path"
            + (f", or {fix}." if fix else ".")
        )
    return path


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` (``.NAME.*.tmp``) that replaces ``path`` in one rename when the block
    succeeds: readers and resuming writers see the old file or the whole new one, never a half-written one, and an
    interrupted write leaves no temporary behind. For writers that need a file name (safetensors' ``save_file``);
    ``atomic_write`` writes bytes or text. No policy: callers check the target first (``write_file`` does)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _unwritable(path, error) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private; the result is meant to be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through ``atomic_file``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_file(path: str | os.PathLike, data: str | bytes, owner: str, *, overwrite: bool = False) -> Path:
    """Write one file atomically (``atomic_write``) under ``check_file_target``'s policy, and record it in its
    directory's ``WRITTEN_LIST`` as ``owner``'s, so a later run of ``owner`` may replace it."""
    path = atomic_write(check_file_target(path, owner, overwrite=overwrite), data)
    _record_written(path.parent, path.name, owner)
    return path


def check_claimable(target: str | os.PathLike, owner: str, *, legacy: bool = False, fix: str = "") -> Path:
    """Refuse a directory that an incremental writer (distill, feature cache) may not fill: anything but a new or
    empty directory, or one ``owner`` claimed before (``legacy``: one the caller recognises as its own from before
    claims existed). Read-only: call it before any work."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; choose another directory (or remove the file).")
    if not target.exists():  # a new one must be creatable; an existing one may be complete and read-only (shared)
        check_writable(target)
    entries = sorted(p.name for p in target.iterdir() if p.name != WRITTEN_LIST) if target.is_dir() else []
    if entries and not legacy and _written_lines(target).get("*") != owner:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(
            f"{target} already holds files {owner} did not write ({shown}); nothing was changed. "
            + (fix or f"Choose another directory, or empty {target} yourself if its contents may go.")
        )
    return target


def claim_directory(target: str | os.PathLike, owner: str, *, legacy: bool = False, fix: str = "") -> Path:
    """``check_claimable``, then create the directory and mark it as ``owner``'s (a ``*`` line in its list)."""
    target = check_claimable(target, owner, legacy=legacy, fix=fix)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(target, error) from None
    _record_written(target, "*", owner)
    return target
