"""Export a Kangaroo adapter as a standalone draft model that serving engines and HF assisted generation can load.

The draft is a plain transformers model of the base's own architecture class with ℓ + n decoder layers: the base's
first ℓ layers, then the adapter's n blocks as decoder layers ℓ, …, ℓ + n - 1 (attention block, and MLP block when
the adapter has one; an attention-only block gets an all-zero MLP, which adds nothing to the residual), the adapter's
final norm, and the base's embeddings and LM head. Its logits equal Kangaroo's draft logits over the FULL
vocabulary: an adapter's draft vocabulary (``draft_vocab``, FR-Spec style) is not carried over, since plain
architectures have no place for it. Engines that run a separate draft model recompute the shallow layers there and
never exit early, so this route is expected to be slower than kangaroo's own decoding (docs/serving.md).

``check_engine_rules`` checks a written draft against what vLLM's ``draft_model`` method reads (read in vLLM 0.32's
``vllm/config/speculative.py`` and ``vllm/v1/spec_decode/draft_model.py``); ``export_draft`` runs it on every export.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from .adapter import KangarooAdapter, read_adapter_config
from .base import kangaroo_home, load_base, resolve_base_path
from .dtype import AUTO, DTYPES, auto_dtype
from .files import atomic_directory
from .model import resolve_recorded_base

# vLLM picks the speculative method from the draft's path before it looks at "method": a path containing "eagle-" or
# "eagle3" becomes EAGLE, "dflash" DFlash, "dspark" DSpark (vllm/config/speculative.py, 0.32). "eagle" alone is
# refused too, since other versions have matched it more loosely.
ENGINE_MISREAD_SUBSTRINGS = ("eagle", "dflash", "dspark")
# draft model_types for which vLLM switches the method itself (Medusa, MLP speculator, MTP heads)
ENGINE_SPECIAL_MODEL_TYPES = ("medusa", "mlp_speculator", "eagle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def export_draft(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base: str | os.PathLike | PreTrainedModel | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write the standalone draft model for the adapter checkpoint ``adapter_dir`` to ``out_dir``; return its path.

    ``base`` is an HF directory, hub id, alias or loaded model (default: the base recorded in the adapter).
    ``dtype`` (float32, bfloat16, float16; default float32) is the dtype of the written weights. ``out_dir`` must
    not exist or be empty; nothing is ever deleted, and the directory appears only when it is complete.
    """
    adapter_dir = Path(adapter_dir).expanduser()
    out_dir = Path(out_dir).expanduser()
    target_dtype = _check_dtype(dtype)
    check_engine_path(out_dir)
    _check_target(out_dir)
    config = read_adapter_config(adapter_dir)
    if base is None:
        if not config.base_model:
            raise ValueError(
                f"Adapter {adapter_dir} records no base model; name the base it was trained for "
                f"(base=... in Python, --base on the command line)."
            )
        base = resolve_recorded_base(config.base_model, adapter_dir)
        try:
            base_model = load_base(base, dtype=torch.float32)
        except ValueError as err:
            raise ValueError(
                f"The base model recorded in adapter {adapter_dir} ({config.base_model!r}) cannot be loaded: {err} "
                f"Pass the base explicitly (base=... in Python, --base on the command line)."
            ) from err
    else:
        base_model = load_base(base, dtype=None if isinstance(base, PreTrainedModel) else torch.float32)
    adapter = KangarooAdapter.from_pretrained(adapter_dir, base_model)  # checks the fingerprint, keys and shapes
    tokenizer = _base_tokenizer(base if not isinstance(base, PreTrainedModel) else base_model)
    draft = build_draft(base_model, adapter).to(target_dtype)

    with atomic_directory(out_dir) as tmp:  # appears only when complete; _check_target refused anything there
        draft.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_engine_rules(tmp, base_model.config)
        for path in tmp.rglob("*"):  # safetensors writes owner-only files; a draft model is meant to be shared
            path.chmod(0o755 if path.is_dir() else 0o644)
    return out_dir


def build_draft(base: PreTrainedModel, adapter: KangarooAdapter) -> PreTrainedModel:
    """The draft as an in-memory model (fp32 if the base is), sharing no storage with ``base`` or ``adapter``."""
    ell = adapter.config.exit_layer
    config = draft_config(base.config, ell, adapter.config.num_layers)
    draft = AutoModelForCausalLM.from_config(config, dtype=base.dtype).eval()
    if type(draft) is not type(base):
        raise ValueError(f"The draft was built as {type(draft).__name__}, not the base's {type(base).__name__}.")
    draft.load_state_dict(_draft_state(draft, base, adapter), strict=True)
    draft.generation_config = copy.deepcopy(base.generation_config)
    return draft


def draft_config(base_config: PretrainedConfig, exit_layer: int, adapter_layers: int = 1) -> PretrainedConfig:
    """The base config cut to ℓ + n layers whose last n layers (the adapter's blocks) attend to the whole context."""
    config = copy.deepcopy(base_config)
    config.num_hidden_layers = exit_layer + adapter_layers
    model_type = config.model_type
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" and window is not None:
        # MistralForCausalLM applies one window to every layer; it only never bites within the model's positions.
        limit = getattr(config, "max_position_embeddings", None)
        if limit is None or window < limit:
            raise ValueError(
                f"This Mistral base uses a sliding window of {window} tokens (max_position_embeddings {limit}) in "
                f"every layer, but the adapter layer attends to the whole context: MistralForCausalLM cannot "
                f"express that, so no exact standalone draft exists for it. Use kangaroo's own decoding."
            )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = list(layer_types[:exit_layer]) + ["full_attention"] * adapter_layers
    if model_type == "qwen2":
        # The older rule (layers >= max_window_layers slide) must agree where it can: with no sliding shallow
        # layer, every layer of the draft is full attention.
        if "sliding_attention" not in (config.layer_types or []):
            config.max_window_layers = exit_layer + adapter_layers
    return config


def _draft_state(draft: PreTrainedModel, base: PreTrainedModel, adapter: KangarooAdapter) -> dict[str, torch.Tensor]:
    """Every parameter of ``draft`` (as its state_dict names them), taken from the base and the adapter."""
    ell = adapter.config.exit_layer
    names = {module: name for name, module in draft.named_modules()}
    dec, head = names[draft.get_decoder()], names[draft.get_output_embeddings()]
    base_dec = base.get_decoder()
    state: dict[str, torch.Tensor] = {}

    def put(prefix: str, module_state: dict[str, torch.Tensor]) -> None:
        state.update({f"{prefix}.{key}": value.detach().clone() for key, value in module_state.items()})

    put(f"{dec}.embed_tokens", base_dec.embed_tokens.state_dict())
    for idx in range(ell):
        put(f"{dec}.layers.{idx}", base_dec.layers[idx].state_dict())
    for i, block in enumerate(adapter.all_blocks()):
        layer = f"{dec}.layers.{ell + i}"
        put(f"{layer}.input_layernorm", block.input_layernorm.state_dict())
        put(f"{layer}.self_attn", block.self_attn.state_dict())
        if adapter.config.mlp:
            put(f"{layer}.post_attention_layernorm", block.post_attention_layernorm.state_dict())
            put(f"{layer}.mlp", block.mlp.state_dict())
        else:  # zero MLP: the layer adds nothing after its attention, exactly as the attention-only block
            draft_layer = draft.get_decoder().layers[ell + i]
            norm = draft_layer.post_attention_layernorm.state_dict()
            put(f"{layer}.post_attention_layernorm", {k: torch.ones_like(v) for k, v in norm.items()})
            put(f"{layer}.mlp", {k: torch.zeros_like(v) for k, v in draft_layer.mlp.state_dict().items()})
    put(f"{dec}.norm", adapter.norm.state_dict())
    put(head, base.get_output_embeddings().state_dict())  # the tied head's name too: it is one tensor in the draft
    return state


def check_engine_path(path: str | os.PathLike) -> None:
    """Refuse a draft path that vLLM would read as the name of an EAGLE / DFlash / DSpark head."""
    text = str(Path(path).expanduser().absolute()).lower()
    hits = [s for s in ENGINE_MISREAD_SUBSTRINGS if s in text]
    if hits:
        raise ValueError(
            f"Output path {str(path)!r} contains {' and '.join(repr(h) for h in hits)}: vLLM chooses its "
            f"speculative method from the draft's path and would load this plain draft model as an EAGLE / DFlash / "
            f"DSpark head, even with method 'draft_model'. Choose a path without 'eagle', 'dflash' or 'dspark' "
            f"(for example drafts/smollm2)."
        )


def check_engine_rules(draft_dir: str | os.PathLike, base_config: PretrainedConfig | dict) -> None:
    """Check a written draft directory against what vLLM's ``draft_model`` method needs; one ValueError if not.

    The rules: a path vLLM does not misread (``check_engine_path``); config.json with the base's model_type and
    architecture (a Medusa / MLP-speculator / EAGLE model_type would switch the method); the target's vocab_size
    (``verify_equal_vocab_size_if_draft_model``) and max_position_embeddings (the draft serves the target's context);
    num_hidden_layers matching the layers in the weights; its own embeddings and LM head in the weights (vLLM shares
    neither with the target for a draft model): ``lm_head.weight``, or ``tie_word_embeddings`` with the embeddings;
    and tokenizer files (vLLM uses the target's tokenizer; HF assisted generation and SGLang read the draft's).
    """
    draft_dir = Path(draft_dir)
    base = base_config.to_dict() if isinstance(base_config, PretrainedConfig) else dict(base_config)
    check_engine_path(draft_dir)
    config_path = draft_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"Draft {draft_dir} has no config.json; engines read the architecture from it.")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type in ENGINE_SPECIAL_MODEL_TYPES or model_type != base.get("model_type"):
        raise ValueError(
            f"Draft {draft_dir}: model_type {model_type!r} is not the base's {base.get('model_type')!r}; vLLM would "
            f"not load it as a plain draft model."
        )
    if config.get("architectures") != base.get("architectures"):
        raise ValueError(
            f"Draft {draft_dir}: architectures {config.get('architectures')} differ from the base's "
            f"{base.get('architectures')}."
        )
    for key in ("vocab_size", "max_position_embeddings", "hidden_size"):
        if config.get(key) != base.get(key):
            raise ValueError(
                f"Draft {draft_dir}: {key} is {config.get(key)}, the base's is {base.get(key)}; vLLM requires the "
                f"draft's to equal the target's."
            )
    weights = _weight_names(draft_dir)
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in weights if ".layers." in name}
    if sorted(layers) != list(range(config.get("num_hidden_layers", -1))):
        raise ValueError(
            f"Draft {draft_dir}: num_hidden_layers is {config.get('num_hidden_layers')} but the weights hold layers "
            f"{sorted(layers)}."
        )
    embed = [n for n in weights if n.endswith("embed_tokens.weight")]
    if not embed:
        raise ValueError(f"Draft {draft_dir}: the weights carry no embeddings (embed_tokens.weight).")
    if "lm_head.weight" not in weights and not config.get("tie_word_embeddings", False):
        raise ValueError(
            f"Draft {draft_dir}: the weights carry no lm_head.weight and tie_word_embeddings is false, so the draft "
            f"has no LM head; vLLM does not lend it the target's."
        )
    if not any((draft_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"Draft {draft_dir} carries no tokenizer file (one of {list(TOKENIZER_FILES)}).")


def _weight_names(draft_dir: Path) -> set[str]:
    """The tensor names in the draft's safetensors files."""
    files = sorted(draft_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"Draft {draft_dir} holds no *.safetensors weights.")
    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == AUTO:  # as the machine would decode: bf16 where it is native and faster
        return auto_dtype("cpu", kangaroo_home())[0]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported for the draft; choose one of {list(DTYPES)}.")


def _check_target(out_dir: Path) -> None:
    """Refuse an output path holding anything: exporting never deletes or overwrites files."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(
            f"Output {str(out_dir)!r} already exists and is not an empty directory; choose a new path (nothing is "
            f"overwritten)."
        )


def _base_tokenizer(base: str | os.PathLike | PreTrainedModel):
    """The base's tokenizer, which the draft directory carries (engines and assisted generation expect it)."""
    name = base.config.name_or_path if isinstance(base, PreTrainedModel) else str(base)
    if not name:
        raise ValueError(
            "The base model was given in memory without a name_or_path, so its tokenizer cannot be found; the draft "
            "directory needs it. Pass the base's directory (or save the model with its tokenizer first)."
        )
    try:
        return AutoTokenizer.from_pretrained(resolve_base_path(name))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load the tokenizer of the base model {name!r} ({err}); the draft directory needs it. Pass "
            f"a base directory that holds tokenizer files."
        ) from err
