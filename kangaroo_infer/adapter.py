"""The Kangaroo adapter and its checkpoint format; the one definition used by training and by decoding.

Adapter (the paper's design): input RMSNorm -> one self-attention block of the base model's own attention class ->
residual -> final RMSNorm; the base model's frozen LM head turns its output into draft logits. An optional MLP block
(``mlp=True``: post-attention RMSNorm -> the base model's MLP class -> residual) adds capacity where the
attention-only adapter drafts too badly to pay for itself, and ``num_layers`` > 1 stacks more such blocks (each with
its own keys/values, adapter cache layer i) before the final norm.

A checkpoint is a directory with ``config.json`` (adapter settings, exit layer, the base model it was trained for and
a fingerprint of that base, optional generation defaults) and ``model.safetensors`` (adapter weights only).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .arch import check_supported
from .checks import is_int

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "kangaroo-adapter"
FORMAT_VERSION = 1
INITS = ("random", "copy")


def base_fingerprint(config: PretrainedConfig) -> dict[str, Any]:
    """What must match between the base an adapter was trained for and the base it is used with."""
    heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {
        "rope_theta": getattr(config, "rope_theta", None),
        "rope_scaling": getattr(config, "rope_scaling", None),
    }
    fingerprint = {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
        "rope": rope,
    }
    return json.loads(json.dumps(fingerprint))  # normalise (tuples -> lists) so it compares equal after a round trip


def check_exit_layer(exit_layer: int, num_layers: int) -> None:
    """The adapter needs at least one shallow layer to draft from and one deep layer to verify with."""
    if not is_int(exit_layer, 1, num_layers - 1):
        raise ValueError(
            f"exit_layer={exit_layer!r} is out of range for a base model with {num_layers} layers: "
            f"choose an integer in [1, {num_layers - 1}]."
        )


@dataclass
class AdapterConfig:
    """Everything in a checkpoint's config.json."""

    exit_layer: int
    base_fingerprint: dict[str, Any]
    base_model: str | None = None  # path, hub id or alias the adapter was trained for
    init: str = "random"
    mlp: bool = False
    num_layers: int = 1  # adapter blocks (attention [+ MLP]) before the final norm
    draft_vocab_size: int | None = None  # drafts come from this many frequent tokens (None = the full vocabulary)
    generation: dict[str, Any] = field(default_factory=dict)  # optional defaults: threshold, max_draft_steps
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> AdapterConfig:
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-export the adapter checkpoint.") from err
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f'{path} is not a Kangaroo adapter config (missing "format": "{FORMAT}").')
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {raw.get('format_version')!r}; this kangaroo reads version "
                f"{FORMAT_VERSION}. Upgrade kangaroo or re-export the adapter."
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; it was written by another kangaroo version.")
        missing = sorted(k for k in ("exit_layer", "base_fingerprint") if k not in raw)
        if missing:
            raise ValueError(f"{path} lacks required keys {missing}; re-export the adapter checkpoint.")
        config = cls(**raw)
        config.check(path)
        return config

    def check(self, where: str | os.PathLike = "adapter config") -> None:
        """Type and range of every field (a damaged or hand-edited config.json), as one error naming the field."""

        problems = {
            "exit_layer": (is_int(self.exit_layer, 1), "an integer >= 1"),
            "base_fingerprint": (isinstance(self.base_fingerprint, dict), "a JSON object"),
            "base_model": (self.base_model is None or isinstance(self.base_model, str), "a string or null"),
            "init": (self.init in INITS, f"one of {list(INITS)}"),
            "mlp": (isinstance(self.mlp, bool), "true or false"),
            "num_layers": (is_int(self.num_layers, 1), "an integer >= 1"),
            "draft_vocab_size": (self.draft_vocab_size is None or is_int(self.draft_vocab_size, 1), "null or >= 1"),
            "generation": (isinstance(self.generation, dict), "a JSON object"),
        }
        for key, (ok, what) in problems.items():
            if not ok:
                raise ValueError(
                    f"{where}: {key}={getattr(self, key)!r} must be {what}; the file is damaged or was edited by hand. "
                    f"Re-export the adapter (or restore {key} in it)."
                )


@dataclass
class _BaseModules:
    attention: type[nn.Module]
    norm: type[nn.Module]
    mlp: type[nn.Module]
    rotary: type[nn.Module]


def _base_modules(config: PretrainedConfig) -> _BaseModules:
    """The base architecture's own module classes, found by building a one-layer copy on the meta device."""
    check_supported(config)
    one_layer = copy.deepcopy(config)
    one_layer.num_hidden_layers = 1
    if getattr(one_layer, "layer_types", None) is not None:
        one_layer.layer_types = one_layer.layer_types[:1]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(one_layer)
    decoder = skeleton.get_decoder()
    layer = decoder.layers[0]
    return _BaseModules(type(layer.self_attn), type(layer.input_layernorm), type(layer.mlp), type(decoder.rotary_emb))


def _adapter_attention_config(config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    """The base config, reduced to the adapter's full-attention layers (the adapter never uses a sliding window)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * num_layers
    if getattr(cfg, "sliding_window", None) is not None:
        cfg.sliding_window = None
    if hasattr(cfg, "use_sliding_window"):
        cfg.use_sliding_window = False
    return cfg


class AdapterBlock(nn.Module):
    """One adapter block: RMSNorm -> the base's attention -> residual [-> RMSNorm -> the base's MLP -> residual]."""

    def __init__(self, mods: _BaseModules, attn_config: PretrainedConfig, mlp: bool, layer_idx: int):
        super().__init__()
        hidden, eps = attn_config.hidden_size, attn_config.rms_norm_eps
        self.input_layernorm = mods.norm(hidden, eps=eps)
        self.self_attn = mods.attention(attn_config, layer_idx=layer_idx)  # its keys/values: adapter cache layer idx
        self.has_mlp = mlp
        if mlp:
            self.post_attention_layernorm = mods.norm(hidden, eps=eps)
            self.mlp = mods.mlp(attn_config)

    def forward(
        self,
        hidden: torch.Tensor,  # [B, q, H] residual stream
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [B, q, head_dim]
        attention_mask: torch.Tensor | None,  # [B, 1, q, kv] or None (causal)
        cache=None,
    ) -> torch.Tensor:  # [B, q, H]
        attn, _ = self.self_attn(
            self.input_layernorm(hidden),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
        )
        hidden = hidden + attn
        if self.has_mlp:
            hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden

    @torch.no_grad()
    def copy_layer(self, layer: nn.Module) -> None:
        """Take a base decoder layer's attention block (and MLP block)."""
        self.input_layernorm.load_state_dict(layer.input_layernorm.state_dict())
        self.self_attn.load_state_dict(layer.self_attn.state_dict())
        if self.has_mlp:
            self.post_attention_layernorm.load_state_dict(layer.post_attention_layernorm.state_dict())
            self.mlp.load_state_dict(layer.mlp.state_dict())

    @torch.no_grad()
    def silence(self) -> None:
        """Zero the projections that write into the residual stream: the block then passes its input through."""
        for name, param in self.named_parameters():
            if name.startswith(("self_attn.o_proj.", "mlp.down_proj.")):
                param.zero_()


class KangarooAdapter(AdapterBlock):
    """Maps exit-layer hidden states (input of base layer ℓ) to hidden states that the base LM head reads.

    The adapter is its own first block (so a one-block checkpoint's keys are ``self_attn.*``, ``mlp.*``, ...);
    further blocks live in ``blocks`` (``blocks.0`` is the second one).
    """

    def __init__(self, config: AdapterConfig, base_config: PretrainedConfig):
        check_exit_layer(config.exit_layer, base_config.num_hidden_layers)
        if config.init not in INITS:
            raise ValueError(f"Unknown adapter init {config.init!r}; choose one of {list(INITS)}.")
        layers = config.num_layers
        if not is_int(layers, 1):
            raise ValueError(f"Adapter num_layers={layers!r} must be an integer >= 1 (1 is the paper's adapter).")
        mods = _base_modules(base_config)
        attn_config = _adapter_attention_config(base_config, layers)
        super().__init__(mods, attn_config, config.mlp, layer_idx=0)
        self.config = config
        self.base_config = base_config
        if layers > 1:
            self.blocks = nn.ModuleList(AdapterBlock(mods, attn_config, config.mlp, i) for i in range(1, layers))
        self.norm = mods.norm(base_config.hidden_size, eps=base_config.rms_norm_eps)
        self.rotary_emb = mods.rotary(config=attn_config)  # buffers only (not saved)
        if config.draft_vocab_size is not None:
            self.register_buffer("draft_vocab", torch.zeros(config.draft_vocab_size, dtype=torch.long))

    def all_blocks(self) -> list[AdapterBlock]:
        """The blocks in the order they run."""
        return [self, *getattr(self, "blocks", [])]

    def set_draft_vocab(self, token_ids: torch.Tensor | list[int]) -> None:
        """Restrict drafting to these token ids (e.g. the most frequent ones in the training data, as FR-Spec does).

        Only the draft's LM head shrinks (a draft step then computes |draft vocab| logits instead of V); verification
        keeps the full head, so decoding stays lossless. Stored in the checkpoint as the ``draft_vocab`` buffer.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().cpu()
        vocab = self.base_config.vocab_size
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"A draft vocabulary needs 1..{vocab} token ids within [0, {vocab}).")
        if ids.unique().numel() != ids.numel():
            raise ValueError("The draft vocabulary repeats token ids; pass each id once.")
        device = self.norm.weight.device
        if "draft_vocab" in self._buffers:
            del self._buffers["draft_vocab"]
        self.register_buffer("draft_vocab", ids.to(device))
        self.config.draft_vocab_size = ids.numel()

    @classmethod
    def for_base(
        cls,
        base: PreTrainedModel,
        exit_layer: int,
        init: str = "random",
        mlp: bool = False,
        base_name: str | None = None,
        num_layers: int = 1,
    ) -> KangarooAdapter:
        """A fresh adapter for ``base``: torch-default weights (``random``) or copied from base layers ℓ, ℓ + 1, …
        (``copy``)."""
        check_exit_layer(exit_layer, base.config.num_hidden_layers)
        config = AdapterConfig(
            exit_layer=exit_layer,
            base_fingerprint=base_fingerprint(base.config),
            base_model=base_name if base_name is not None else (base.config.name_or_path or None),
            init=init,
            mlp=mlp,
            num_layers=num_layers,
        )
        adapter = cls(config, base.config)
        param = next(base.parameters())
        adapter.to(device=param.device, dtype=param.dtype)
        if init == "copy":
            adapter.copy_from(base)
        return adapter

    @torch.no_grad()
    def copy_from(self, base: PreTrainedModel) -> None:
        """Initialise block i from base layer ℓ + i (the last layer for blocks past it), the norm from the base's."""
        decoder = base.get_decoder()
        last = len(decoder.layers) - 1
        for i, block in enumerate(self.all_blocks()):
            block.copy_layer(decoder.layers[min(self.config.exit_layer + i, last)])
        self.norm.load_state_dict(decoder.norm.state_dict())

    @torch.no_grad()
    def grow_from(self, smaller: KangarooAdapter) -> None:
        """Start from a trained adapter with fewer blocks: its blocks, norm and draft vocabulary are taken as they
        are, and the blocks it lacks are silenced (they pass their input through), so this adapter drafts exactly
        as ``smaller`` until training moves it."""
        ours, theirs = self.config, smaller.config
        same = {"exit_layer": ours.exit_layer, "mlp": ours.mlp, "base_fingerprint": ours.base_fingerprint}
        diffs = [f"{k}: {getattr(theirs, k)!r} vs {v!r}" for k, v in same.items() if getattr(theirs, k) != v]
        if theirs.num_layers > ours.num_layers:
            diffs.append(f"num_layers: {theirs.num_layers} vs {ours.num_layers} (it has more blocks)")
        if diffs:
            raise ValueError(f"Cannot grow this adapter from one that differs in {'; '.join(diffs)}.")
        if getattr(smaller, "draft_vocab", None) is not None:
            self.set_draft_vocab(smaller.draft_vocab)
        for block in self.all_blocks()[theirs.num_layers :]:
            block.silence()
        state = self.state_dict()
        state.update(smaller.state_dict())  # every key of the smaller adapter is a key of this one, same shape
        self.load_state_dict(state, strict=True)

    def forward(
        self,
        exit_states: torch.Tensor,  # [B, q, H] hidden states entering base layer ℓ
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin: [B, q, head_dim]
        position_ids: torch.Tensor | None = None,  # [B, q]; used when position_embeddings is None
        attention_mask: torch.Tensor | None = None,  # [B, 1, q, kv] or None (causal)
        cache=None,  # transformers Cache holding the adapter's own keys/values (layer i: block i)
    ) -> torch.Tensor:  # [B, q, H], ready for the base LM head
        if position_embeddings is None:
            if position_ids is None:
                position_ids = torch.arange(exit_states.shape[1], device=exit_states.device)[None]
            position_embeddings = self.rotary_emb(exit_states, position_ids=position_ids)
        hidden = exit_states
        for block in self.all_blocks():  # the first block is this module itself, hence the explicit call
            hidden = AdapterBlock.forward(block, hidden, position_embeddings, attention_mask, cache)
        return self.norm(hidden)

    # ---- checkpoint -------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, generation: dict[str, Any] | None = None) -> Path:
        """Write config.json + model.safetensors (adapter weights only, fp32 unless already lower)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if generation is not None:
            self.config.generation = dict(generation)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "kangaroo": FORMAT})
        os.chmod(directory / WEIGHTS_NAME, 0o644)  # safetensors writes owner-only files; checkpoints are shared
        (directory / CONFIG_NAME).write_text(self.config.to_json())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base: PreTrainedModel) -> KangarooAdapter:
        """Load a checkpoint strictly: its base fingerprint, keys and shapes must all match."""
        directory = Path(directory).expanduser()
        config = read_adapter_config(directory)
        check_fingerprint(config, base.config, directory)
        adapter = cls(config, base.config)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"Adapter checkpoint {directory} has no {WEIGHTS_NAME}; re-export it.")
        try:
            state = load_file(str(weights))
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{weights} is not a readable safetensors file ({err}); re-export the adapter.") from err
        expected = adapter.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs adapter {tuple(expected[k].shape)}"
            for k in sorted(set(state) & set(expected))
            if state[k].shape != expected[k].shape
        ]
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if mismatched:
            problems.append(f"shape mismatches [{'; '.join(mismatched)}]")
        if problems:
            raise ValueError(
                f"Adapter weights in {weights} do not fit the adapter described by its config.json: "
                f"{', '.join(problems)}. The checkpoint is damaged or was written for another adapter layout."
            )
        check_finite(state, str(weights))
        adapter.load_state_dict(state, strict=True)
        if "draft_vocab" in state:
            vocab = base.config.vocab_size
            draft = state["draft_vocab"]
            if int(draft.min()) < 0 or int(draft.max()) >= vocab or draft.unique().numel() != draft.numel():
                raise ValueError(f"{weights}: draft_vocab holds repeated ids or ids outside [0, {vocab}).")
        param = next(base.parameters())
        return adapter.to(device=param.device, dtype=param.dtype)


def read_adapter_config(directory: str | os.PathLike) -> AdapterConfig:
    """The config of an adapter checkpoint directory, with a clear error for a wrong path."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"Adapter checkpoint {str(directory)!r} does not exist or is not a directory; pass the directory "
            f"written by adapter.save_pretrained or kangaroo_train's export (it holds {CONFIG_NAME})."
        )
    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"{directory} has no {CONFIG_NAME}: it is not a Kangaroo adapter checkpoint directory.")
    return AdapterConfig.from_file(directory / CONFIG_NAME)


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN / inf adapter weights: they draft nothing useful and usually mean training diverged or read
    damaged features."""
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(
            f"{where} holds non-finite (NaN/inf) adapter weights in {bad[:5]}: the training run diverged or read "
            f"damaged data. Retrain (check the feature cache and optim.lr) or export an earlier checkpoint."
        )


def check_fingerprint(config: AdapterConfig, base_config: PretrainedConfig, where: str | os.PathLike = "") -> None:
    """Refuse an adapter trained for another base model, naming every field that differs."""
    actual = base_fingerprint(base_config)
    diffs = [
        f"{key}: adapter {config.base_fingerprint.get(key)!r} vs base {actual.get(key)!r}"
        for key in sorted(set(actual) | set(config.base_fingerprint))
        if config.base_fingerprint.get(key) != actual.get(key)
    ]
    if diffs:
        raise ValueError(
            f"Adapter {where} was trained for another base model ({config.base_model!r}); the base given "
            f"({base_config.name_or_path!r}) differs in {'; '.join(diffs)}. Use the base it was trained for or "
            f"train an adapter for this one."
        )
    check_exit_layer(config.exit_layer, base_config.num_hidden_layers)
