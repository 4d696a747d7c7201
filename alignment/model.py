"""``DualEncoder``: a Hugging Face backbone, pooling, projection, normalisation.

Architecture only: no Lightning, no ranks, no loss. One shared encoder embeds
every language (the LaBSE / multilingual-E5 setup); every sentence of a
:class:`~alignment.batch.Batch` is encoded in one forward pass::

    input_ids (N, T) --backbone--> hidden (N, T, H) --pool--> (N, H)
        --[projection]--> (N, D) --[L2 normalise]--> (N, D), at least float32

The backbone comes from the hub or a local folder (``AutoModel``), or is built
from a config with random weights (tests, benchmarks, the tiny debug model).
``save_pretrained`` writes the backbone in Hugging Face format plus
``alignment_encoder.json`` (pooling, projection, normalisation) and the
projection weights, and ``from_pretrained`` on that folder restores all of it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignment import adapters
from alignment.adapters import TINY, AdapterConfig  # TINY: the random debug encoder's name
from alignment.batch import Batch

Pooling = Literal["mean", "cls", "last"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
ENCODER_META = "alignment_encoder.json"
PROJECTION_FILE = "projection.safetensors"
PIVOT_SUBDIR = "pivot_encoder"
SHARED_LOOKUP = frozenset({"bert", "xlm-roberta", "roberta", "distilbert", "camembert"})
"""Backbones whose ``inputs_embeds`` path gives the ``input_ids`` path's states on real tokens (right padding):
the lookup is the only use of the ids (XLM-R/RoBERTa number pad positions differently, masked out anyway)."""


# --------------------------------------------------------------------------- config


def max_positions(config) -> int | None:
    """Longest input (tokens, specials included) a Hugging Face backbone config can embed; None when unbounded."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    if "roberta" in str(getattr(config, "model_type", "")):
        # RoBERTa/XLM-R number positions from padding_idx + 1: two rows of the table are never used
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1
    return int(limit)


@dataclass
class ModelConfig:
    """Which backbone to load and how to turn its hidden states into sentence embeddings."""

    name_or_path: str = TINY
    """Hub name (``intfloat/multilingual-e5-small``, ``xlm-roberta-base``, ``sentence-transformers/LaBSE``)
    or a local folder for ``AutoModel``; ``tiny`` is the 2-layer debug BERT with random weights."""
    random_init: bool = False
    """Build ``name_or_path``'s architecture from its config with random weights (benchmarks)."""
    vocab_size: int | None = None
    """Vocabulary size for ``tiny`` or ``random_init`` (the tokenizer's ``len``); required for ``tiny``."""
    pooling: Pooling = "mean"
    """``mean`` (masked mean over tokens: E5, sentence-transformers), ``cls`` (first token: LaBSE)
    or ``last`` (last real token: decoder models)."""
    projection_dim: int | None = None
    """Width of a linear projection head after pooling; None keeps the backbone width."""
    normalize: bool = True
    """L2-normalise embeddings, so dot products are cosines (the losses assume it)."""
    share_encoder: bool = True
    """One encoder for all languages; False gives the pivot language its own copy of the backbone
    (twice the parameters; both towers must be used every step under DDP)."""
    freeze_embeddings: bool = False
    """Freeze the word-embedding table (for XLM-R/E5 the largest tensor: no gradient, no optimiser state)."""
    freeze_layers: int = 0
    """Freeze the first N transformer layers (combine with freeze_embeddings to freeze the bottom)."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in backward (non-reentrant; about +30% compute, far less memory)."""
    attn_implementation: str | None = None
    """Attention kernel: ``sdpa``, ``eager``, ``flash_attention_2``...; None = SDPA where the model
    supports it, else eager. ``sdpa_varlen`` is SDPA plus a variable-length path for packed steps
    (``--model.step.unpadded``, ``alignment/packing.py``: PyTorch's varlen flash kernel on CUDA)."""
    attention_dropout: float | None = None
    """Dropout on the attention probabilities while training (the backbone config's
    ``attention_probs_dropout_prob``, or ``attention_dropout``); null keeps the model's (0.1 for BERT, XLM-R,
    multilingual-E5). 0 lets ``--model.step.unpadded auto`` pack training steps through ``sdpa_varlen``
    (PyTorch's varlen kernel has no dropout). Saved in the export's config."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """Parameter-efficient training with peft: LoRA, language adapters (``alignment/adapters.py``)."""

    def __post_init__(self) -> None:
        self.adapter = adapters.as_config(self.adapter)  # a checkpoint's dict
        if self.adapter.enabled and not self.share_encoder:
            raise ValueError("--model.encoder.adapter.method lora needs --model.encoder.share_encoder true "
                             "(adapters on one shared tower)")
        if self.adapter.checkpoint_adapter_only and (self.random_init or not adapters.base_reloads(self.name_or_path)):
            raise ValueError("--model.encoder.adapter.checkpoint_adapter_only needs a base that reloads: "
                             f"--model.encoder.name_or_path {self.name_or_path!r} with random weights does not")
        if not self.name_or_path:
            raise ValueError("--model.encoder.name_or_path must be a hub name, a local folder or 'tiny', got ''")
        if self.pooling not in POOLINGS:
            raise ValueError(f"--model.encoder.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(
                f"--model.encoder.projection_dim must be >= 1 (or null for none), got {self.projection_dim}"
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"--model.encoder.vocab_size must be >= 1, got {self.vocab_size}")
        if self.name_or_path == TINY and self.vocab_size is None:
            raise ValueError(
                "--model.encoder.vocab_size is required with --model.encoder.name_or_path=tiny (the tokenizer's length)"
            )
        if self.freeze_layers < 0:
            raise ValueError(f"--model.encoder.freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.attn_implementation is not None and not self.attn_implementation:
            raise ValueError("--model.encoder.attn_implementation must be a kernel name or null, got ''")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"--model.encoder.attention_dropout must be in [0, 1) or null, got {self.attention_dropout}")


# --------------------------------------------------------------------------- pooling


def pool(hidden: Tensor, attention_mask: Tensor, how: str) -> Tensor:
    """Sentence vectors from token states.

    Args:
        hidden: ``(N, T, H)`` last hidden states.
        attention_mask: ``(N, T)``, 1 on real tokens; left or right padding.
        how: ``mean`` (average of real tokens), ``cls`` (first real token) or
            ``last`` (last real token).

    Returns:
        ``(N, H)``. Padding never contributes, whatever its token ids.
    """
    mask = attention_mask.to(hidden.dtype)  # (N, T)
    if how == "mean":
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)  # (N, H)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    positions = torch.arange(1, mask.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)  # (T,)
    if how == "cls":
        index = attention_mask.long().argmax(dim=1)  # (N,) first 1 (argmax returns the first maximum)
    elif how == "last":
        index = (mask * positions).argmax(dim=1)  # (N,) last 1
    else:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {how!r}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (N, H)


def transformer_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer blocks (BERT, XLM-R, DistilBERT, GPT-2, T5, Llama layouts)."""
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers", "h", "block", "encoder.block"):
        module = backbone
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the transformer layers of {type(backbone).__name__} to freeze")


# --------------------------------------------------------------------------- encoder


class DualEncoder(nn.Module):
    """Shared multilingual sentence encoder (a dual encoder with tied towers).

    Build with :meth:`from_pretrained`, :meth:`from_config` or
    :meth:`from_model_config`; :meth:`tiny_config` gives the debug backbone.

    The Hugging Face pooler (a dense + tanh head trained for next-sentence
    prediction) is unused by every pooling here; it is frozen rather than
    removed so that the saved folder reloads without missing weights, and so
    that DDP does not see an unused trainable parameter.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        pooling: str = "mean",
        projection_dim: int | None = None,
        normalize: bool = True,
        share_encoder: bool = True,
        freeze_embeddings: bool = False,
        freeze_layers: int = 0,
        gradient_checkpointing: bool = False,
        pivot_backbone: nn.Module | None = None,
        adapter: AdapterConfig | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"--model.encoder.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize
        self.share_encoder = share_encoder
        hidden = backbone.config.hidden_size
        self.projection = nn.Linear(hidden, projection_dim, bias=False) if projection_dim else None
        if self.projection is not None:
            # Orthogonal rows keep angles of the pretrained space (exactly when D >= H),
            # where a default init would scramble the starting alignment.
            nn.init.orthogonal_(self.projection.weight)
        self.pivot_backbone = None if share_encoder else (pivot_backbone or copy.deepcopy(backbone))
        self._frozen = False
        self.card_extra: dict = {}
        """Keys of the source folder's ``alignment_encoder.json`` beyond :class:`EncoderMeta` (E5's
        ``query_prefix``/``passage_prefix``, origin): carried into :meth:`save_pretrained` so a
        fine-tuned encoder keeps the prefixes it was trained with."""
        for tower in self._towers():
            _configure_backbone(tower, freeze_embeddings, freeze_layers, gradient_checkpointing)
        self.adapter_config = adapters.as_config(adapter)
        self.source_name_or_path: str | None = getattr(backbone, "name_or_path", None) or None
        """The base's hub name or folder (a peft adapter export points at it)."""
        if self.adapter_config.enabled:
            if self.pivot_backbone is not None:
                raise ValueError("--model.encoder.adapter.method lora needs --model.encoder.share_encoder true")
            self.backbone = adapters.attach(self.backbone, self.adapter_config)

    def _towers(self) -> list[nn.Module]:
        return [self.backbone] + ([self.pivot_backbone] if self.pivot_backbone is not None else [])

    # ---------------------------------------------------------------- builders

    @staticmethod
    def tiny_config(vocab_size: int, **overrides):
        """A 2-layer BERT config (hidden 32) for tests, smoke runs and benchmarks."""
        from transformers import BertConfig

        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=0,
        )
        kwargs.update(overrides)
        return BertConfig(**kwargs)

    @classmethod
    def from_config(cls, config, *, attn_implementation: str | None = None, attention_dropout: float | None = None,
                    **knobs) -> "DualEncoder":
        """Random weights in ``config``'s architecture (a ``transformers.PretrainedConfig``)."""
        from transformers import AutoModel

        _register_kernel(attn_implementation)
        config = with_attention_dropout(config, attention_dropout)
        backbone = AutoModel.from_config(config, attn_implementation=attn_implementation)
        return cls(backbone, **knobs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, attn_implementation: str | None = None,
                        attention_dropout: float | None = None, **knobs) -> "DualEncoder":
        """Load a hub model or local folder; a folder written by :meth:`save_pretrained`
        also restores pooling, normalisation, projection and the pivot tower.

        Explicit ``knobs`` override the saved pooling and normalisation; the
        projection width always comes from the folder when it has one.
        """

        path = Path(name_or_path)
        meta = json.loads((path / ENCODER_META).read_text()) if (path / ENCODER_META).is_file() else {}
        if (meta.get("adapter") or {}).get("format") == "router":
            raise ValueError(f"{path} is a language-adapter export (one encoder per adapter): load it with "
                             "SentenceTransformer(folder).encode(texts, task=LANGUAGE), or use the training checkpoint")
        settings = {k: meta[k] for k in ("pooling", "normalize", "projection_dim", "share_encoder") if k in meta}
        settings.update(knobs)
        if meta:
            settings["projection_dim"] = meta.get("projection_dim")
        _register_kernel(attn_implementation)
        backbone = _load_backbone(str(name_or_path), attn_implementation, attention_dropout)
        pivot = None
        if meta and not meta.get("share_encoder", True):
            pivot = _load_backbone(str(path / PIVOT_SUBDIR), attn_implementation, attention_dropout)
        model = cls(backbone, pivot_backbone=pivot, **settings)
        if model.projection is not None and meta:
            from safetensors.torch import load_file

            model.projection.load_state_dict(load_file(str(path / PROJECTION_FILE)))
        return model

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "DualEncoder":
        """Build from the typed config (what the training module calls)."""
        knobs = dict(
            pooling=cfg.pooling,
            projection_dim=cfg.projection_dim,
            normalize=cfg.normalize,
            share_encoder=cfg.share_encoder,
            freeze_embeddings=cfg.freeze_embeddings,
            freeze_layers=cfg.freeze_layers,
            gradient_checkpointing=cfg.gradient_checkpointing,
            adapter=cfg.adapter,
        )
        if cfg.name_or_path == TINY:
            tiny = cls.tiny_config(cfg.vocab_size)
            return cls.from_config(tiny, attn_implementation=cfg.attn_implementation,
                                   attention_dropout=cfg.attention_dropout, **knobs)
        if cfg.random_init:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(cfg.name_or_path)
            if cfg.vocab_size is not None:
                config.vocab_size = cfg.vocab_size
            return cls.from_config(config, attn_implementation=cfg.attn_implementation,
                                   attention_dropout=cfg.attention_dropout, **knobs)
        meta = _check_saved_settings(cfg)
        model = cls.from_pretrained(cfg.name_or_path, attn_implementation=cfg.attn_implementation,
                                    attention_dropout=cfg.attention_dropout, **knobs)
        model.source_name_or_path = cfg.name_or_path
        model.card_extra = {k: v for k, v in meta.items() if k not in EncoderMeta.__dataclass_fields__}
        return model

    # ---------------------------------------------------------------- encoding

    @property
    def embedding_dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.backbone.config.hidden_size

    def token_embeddings(self, input_ids: Tensor) -> Tensor | None:
        """``(N, T, H)`` word embeddings of ``input_ids`` for :meth:`forward`'s ``inputs_embeds``, or None.

        Length-grouped encoding (``alignment.encode``) looks the whole batch up once and hands each chunk its
        slice: the backward of the word-embedding table (a dense ``vocab x H`` gradient, 96M floats for
        XLM-R/E5) then runs once per step, not once per chunk. None (each chunk looks its tokens up itself)
        with a pivot tower, or for a backbone whose embeddings depend on the token ids beyond the lookup."""
        if self.pivot_backbone is not None or self.backbone.config.model_type not in SHARED_LOOKUP:
            return None
        return self.backbone.get_input_embeddings()(input_ids)

    def encode(self, input_ids: Tensor, attention_mask: Tensor, *, pivot: bool = False,
               inputs_embeds: Tensor | None = None) -> Tensor:
        """Embed ``(N, T)`` token ids: ``(N, D)``, unit norm when ``normalize``.

        ``pivot`` selects the pivot tower when the encoder is not shared.
        Half-precision outputs (autocast, bf16 weights) are returned in float32:
        at temperature 0.05 bf16 cosines would lose two digits of the logits.
        """
        tower = self.pivot_backbone if (pivot and self.pivot_backbone is not None) else self.backbone
        if inputs_embeds is not None:  # the token_embeddings of input_ids (the same numbers, looked up once)
            hidden = tower(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        else:
            hidden = tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        return self.head(pool(hidden, attention_mask, self.pooling))  # (N, H) -> (N, D)

    def head(self, emb: Tensor) -> Tensor:
        """Pooled ``(N, H)`` -> ``(N, D)``: projection, float32 for half precision, L2 normalisation
        (also the tail of the packed path, ``alignment.packing.encode_packed``)."""
        if self.projection is not None:
            emb = self.projection(emb)  # (N, D)
        if emb.dtype in (torch.float16, torch.bfloat16):
            emb = emb.float()
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def forward(self, batch: Batch, inputs_embeds: Tensor | None = None) -> Tensor:
        """Embed every sentence of ``batch`` (all languages together): ``(N, D)``; ``inputs_embeds``: the
        batch's :meth:`token_embeddings` (shared encoder only). With language adapters each sentence goes
        through its language's adapter (:func:`alignment.adapters.routed_forward`)."""
        if self.adapter_config.language_groups:
            return adapters.routed_forward(self, batch, inputs_embeds)
        if self.pivot_backbone is None:
            return self.encode(batch.input_ids, batch.attention_mask, inputs_embeds=inputs_embeds)
        is_pivot = batch.lang_ids == batch.pivot_lang_id  # (N,)
        out = None
        for select, pivot in ((is_pivot, True), (~is_pivot, False)):
            index = torch.nonzero(select).flatten()  # host sync: sizes of the two sub-batches
            if index.numel() == 0:
                continue
            emb = self.encode(batch.input_ids[index], batch.attention_mask[index], pivot=pivot)  # (n_part, D)
            out = emb.new_zeros(batch.num_sentences, emb.shape[1]) if out is None else out
            out = out.index_copy(0, index, emb)  # (N, D), differentiable w.r.t. emb
        return out

    # ---------------------------------------------------------------- freezing, copies, saving

    def frozen_copy(self) -> "DualEncoder":
        """A frozen copy of the encoder (eval mode forever, no gradients) for the drift loss.

        Costs one more copy of the weights (no gradients, no optimiser state):
        about +1/4 of the training memory of the weights under AdamW in fp32
        (weights + gradients + two moments). Keep it *out* of the training
        module's registered submodules, or it lands in every checkpoint; it is
        not sharded under ZeRO-3 (deep-copy before wrapping). With adapters (LoRA) the reference is the
        adapter-free base sharing this encoder's weights (:class:`alignment.adapters.AdapterFreeReference`).
        """
        if adapters.is_adapted(self.backbone):
            return adapters.AdapterFreeReference(self)
        copy_ = copy.deepcopy(self)
        copy_.requires_grad_(False)
        copy_._frozen = True
        return copy_.eval()

    def train(self, mode: bool = True) -> "DualEncoder":
        """As ``nn.Module.train``, but a :meth:`frozen_copy` stays in eval mode (no dropout)."""
        return super().train(mode and not self._frozen)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the backbone (HF format), ``alignment_encoder.json`` and the projection weights.

        An adapted encoder is written merged (its ``default`` adapter folded into the weights)."""
        if adapters.is_adapted(self.backbone):
            if self.adapter_config.language_groups:
                raise ValueError("an encoder with language adapters has no single set of weights: export it with "
                                 "alignment.export.export_encoder (a sentence-transformers Router)")
            return adapters.merged_copy(self).save_pretrained(directory)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(directory))
        if self.pivot_backbone is not None:
            self.pivot_backbone.save_pretrained(str(directory / PIVOT_SUBDIR))
        if self.projection is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.projection.state_dict().items()},
                      str(directory / PROJECTION_FILE))
        meta = EncoderMeta(
            pooling=self.pooling,
            normalize=self.normalize,
            projection_dim=self.projection.out_features if self.projection is not None else None,
            share_encoder=self.pivot_backbone is None,
            embedding_dim=self.embedding_dim,
        )
        card = {**self.card_extra, **asdict(meta)}
        (directory / ENCODER_META).write_text(json.dumps(card, indent=2) + "\n")
        return directory


@dataclass
class EncoderMeta:
    """Contents of ``alignment_encoder.json``: what export needs besides the backbone."""

    pooling: str
    normalize: bool
    projection_dim: int | None
    share_encoder: bool
    embedding_dim: int


def _check_saved_settings(cfg: ModelConfig) -> dict:
    """A folder from :meth:`DualEncoder.save_pretrained` must be loaded with the settings it was
    trained with: a silently different pooling or projection would change every embedding.
    Returns the folder's ``alignment_encoder.json`` (empty when there is none)."""
    meta_file = Path(cfg.name_or_path) / ENCODER_META
    if not meta_file.is_file():
        return {}
    meta = json.loads(meta_file.read_text())
    for key in ("pooling", "normalize", "projection_dim", "share_encoder"):
        if key in meta and meta[key] != getattr(cfg, key):
            raise ValueError(
                f"--model.encoder.{key} is {getattr(cfg, key)!r} but {meta_file} was saved with {meta[key]!r}; "
                f"set --model.encoder.{key} {json.dumps(meta[key])}"
            )
    return meta


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")
"""Where backbone configs keep the attention-probability dropout (BERT/XLM-R/E5, DistilBERT and others)."""


def with_attention_dropout(config, value: float | None):
    """``config`` with its attention dropout set to ``value`` (``--model.encoder.attention_dropout``; None:
    unchanged). Set before the model is built: the attention modules read it when they are constructed."""
    if value is None:
        return config
    for key in ATTENTION_DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, float(value))
            return config
    raise ValueError(f"--model.encoder.attention_dropout: a {config.model_type} config has no attention dropout "
                     f"setting ({' or '.join(ATTENTION_DROPOUT_KEYS)}); leave it null for this model")


def _load_backbone(path: str, attn_implementation: str | None, attention_dropout: float | None):
    from transformers import AutoConfig, AutoModel

    if attention_dropout is None:
        return AutoModel.from_pretrained(path, attn_implementation=attn_implementation)
    config = with_attention_dropout(AutoConfig.from_pretrained(path), attention_dropout)
    return AutoModel.from_pretrained(path, config=config, attn_implementation=attn_implementation)


def _register_kernel(attn_implementation: str | None) -> None:
    """Register ``sdpa_varlen`` (``alignment.packing``) with transformers before a backbone asks for it."""
    from alignment import packing

    if attn_implementation == packing.KERNEL:
        packing.register_kernel()


def _configure_backbone(backbone: nn.Module, freeze_embeddings: bool, freeze_layers: int, checkpointing: bool):
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    if freeze_embeddings:
        backbone.get_input_embeddings().requires_grad_(False)
    if freeze_layers:
        layers = transformer_layers(backbone)
        if freeze_layers > len(layers):
            raise ValueError(
                f"--model.encoder.freeze_layers must be <= the backbone's {len(layers)} layers, got {freeze_layers}"
            )
        for layer in layers[:freeze_layers]:
            layer.requires_grad_(False)
    if checkpointing:
        # use_reentrant=False: correct with frozen inputs (frozen embeddings) and
        # restores the RNG so dropout matches in the recomputation.
        kwargs = {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.x
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
