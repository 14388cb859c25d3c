"""bench's files in ``--out`` and the checks made on them before any work: nothing a user wrote is replaced, and
finished answers are neither lost (without --resume or --overwrite) nor kept by accident."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import check_file_target

ANSWERS = "answers.jsonl"  # one record per question, appended as each finishes
SETTINGS = "bench_settings.json"  # what a resumed run must match
RESULTS, PLOT, SWEEP = "results.json", "speedup.png", "sweep.json"
OWNER = "bench"  # the writer named in --out's written list (kangaroo_infer.files.write_file)


def _complete_lines(path: Path) -> int:
    """Answers in an answers.jsonl: its lines that parse (a line cut off by an interrupted run does not count)."""
    count = 0
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        count += 1
    return count


def may_replace(out_dir: Path, overwrite: bool) -> bool:
    """Whether bench may replace files in ``out_dir`` it did not list as its own: with --overwrite, or in a
    directory an earlier bench wrote before it listed its files (answers and settings both there)."""
    return overwrite or ((out_dir / ANSWERS).is_file() and (out_dir / SETTINGS).is_file())


def check_out_files(out_dir: str | Path, names: tuple[str, ...], overwrite: bool = False) -> None:
    """Refuse, before any work, to replace a file in ``out_dir`` that bench did not write (files.write_file)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; name a directory (a new one, or one bench wrote).")
    replace = may_replace(out_dir, overwrite)
    for name in names:
        check_file_target(out_dir / name, OWNER, overwrite=replace, fix="pass --overwrite to replace it")


def check_out_dir(out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> int:
    """The number of answers already in ``out_dir``; refuses a file, files bench did not write (without
    --overwrite), and answers that neither --resume keeps nor --overwrite discards (forgetting --resume must not
    throw hours of answers away)."""
    out_dir = Path(out_dir)
    check_out_files(out_dir, (SETTINGS, RESULTS, PLOT), overwrite)
    path = out_dir / ANSWERS
    found = _complete_lines(path) if path.is_file() else 0
    if path.exists() and not found:  # no answer in it: a file of the user's, or an empty one of ours
        check_file_target(path, OWNER, overwrite=may_replace(out_dir, overwrite), fix="pass --overwrite to replace it")
    if found and not resume and not overwrite:
        raise ValueError(
            f"{out_dir} already holds {found} answers ({ANSWERS}); pass --resume to keep them and run only the "
            f"missing questions, or --overwrite to discard them and start over (or use another --out)."
        )
    return found


def require_matplotlib() -> None:
    """bench draws speedup.png at the end: find out before decoding for an hour that it cannot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "bench draws speedup.png with matplotlib, which is not installed; pip install 'kangaroo[bench]' "
            "(or pip install matplotlib)."
        ) from None


def display_name(name: Any) -> str | None:
    """A model or adapter as results files record it: a hub id or alias as given, a local path by its directory's
    name (results never hold a path of the machine they ran on)."""
    if name is None or str(name) == "":
        return None
    path = Path(str(name)).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve().name
    return str(name)
