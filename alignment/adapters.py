"""Parameter-efficient training with ``peft``: LoRA on the encoder, optionally one adapter per language group.

``--model.encoder.adapter.method lora`` wraps the backbone in a ``peft.PeftModel``: the pretrained weights
are frozen and only the low-rank adapters (plus the projection head, when there is one) are trained.

* **Language adapters** (``--model.encoder.adapter.language_groups {de: germanic, nl: germanic, fr: romance}``):
  one LoRA adapter per group name on the shared encoder, plus the adapter ``default``, which serves every
  language not listed (the pivot, typically) and, after export, any language the model never saw. A batch
  is encoded group by group (:func:`routed_forward`); every adapter sees only its languages' sentences.
* **Drift reference** (``--model.loss.drift_weight > 0``): the adapter-free base, i.e. the same weights run
  with the adapters switched off (``PeftModel.disable_adapter``) -- no second copy of the backbone
  (:class:`AdapterFreeReference`); only the projection head, trained with the adapters, is copied.
* **Export** (``align export --adapter merge|peft``): ``merge`` folds the adapter into a plain model
  (``merge_and_unload``: ``SentenceTransformer(folder)`` loads it); ``peft`` writes a peft adapter folder
  (``PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder)``). A model with language
  adapters is exported as a sentence-transformers ``Router`` with one merged encoder per adapter,
  selected by ``encode(texts, task=<language code>)`` (:func:`write_language_router`).

Architecture only (no Lightning, no ranks), like ``alignment/model.py``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from alignment.batch import Batch
    from alignment.model import DualEncoder

AdapterMethod = Literal["none", "lora"]
ExportAdapter = Literal["merge", "peft"]
EXPORT_ADAPTERS: tuple[str, ...] = get_args(ExportAdapter)
SHARED = "default"
"""Name of the adapter every language outside ``language_groups`` uses (peft's default adapter name)."""
ST_POOLING = {"mean": "mean", "cls": "cls", "last": "lasttoken"}
ADAPTER_ONLY = "alignment_adapter_only"
"""Checkpoint key: the state dict holds only the trainable parameters (the base reloads from name_or_path)."""


@dataclass
class AdapterConfig:
    """Parameter-efficient training with peft (``--model.encoder.adapter.*``)."""

    method: AdapterMethod = "none"
    """``none`` trains the whole encoder; ``lora`` freezes it and trains low-rank adapters (peft LoRA)."""
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Linear layers to adapt by name (BERT/XLM-R/E5: query, key, value, dense); None = peft's default for
    the architecture (query and value for BERT/XLM-R)."""
    language_groups: dict[str, str] = field(default_factory=dict)
    """Language code -> adapter name, one LoRA adapter per name (``{de: germanic, nl: germanic, fr: romance}``);
    languages not listed, and at inference languages never seen, use the adapter ``default``."""
    checkpoint_adapter_only: bool = False
    """Checkpoints hold only the trainable parameters (adapters, projection); resuming and ``align export``
    reload the frozen base from --model.encoder.name_or_path (a hub name or folder, not ``tiny``)."""

    def __post_init__(self) -> None:
        if self.method not in get_args(AdapterMethod):
            raise ValueError(f"--model.encoder.adapter.method must be one of none, lora, got {self.method!r}")
        if self.r < 1:
            raise ValueError(f"--model.encoder.adapter.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"--model.encoder.adapter.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--model.encoder.adapter.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("--model.encoder.adapter.target_modules must name at least one module, or be null")
        if self.method == "none" and (self.language_groups or self.checkpoint_adapter_only):
            flag = "language_groups" if self.language_groups else "checkpoint_adapter_only"
            raise ValueError(f"--model.encoder.adapter.{flag} needs --model.encoder.adapter.method lora")
        for lang, name in self.language_groups.items():
            if not name or name == SHARED or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(
                    f"--model.encoder.adapter.language_groups: adapter name {name!r} for {lang!r} must be a word "
                    f"(letters, digits, _ or -) other than {SHARED!r} (the adapter of the languages not listed)"
                )

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def adapter_names(self) -> list[str]:
        """Every adapter: ``default`` first, then the groups in first-seen order."""
        return [SHARED, *dict.fromkeys(self.language_groups.values())]

    def adapter_of(self, language: str) -> str:
        return self.language_groups.get(language, SHARED)


def as_config(value: AdapterConfig | dict | None) -> AdapterConfig:
    """An :class:`AdapterConfig` from itself, a checkpoint's dict, or None (no adapter)."""
    if isinstance(value, AdapterConfig):
        return value
    return AdapterConfig(**(value or {}))


def is_adapted(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a peft model (LoRA attached)."""
    from peft import PeftModel

    return isinstance(backbone, PeftModel)


def attach(backbone: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """``backbone`` wrapped in a ``PeftModel`` with the adapters of ``cfg``: base frozen, adapters trainable."""
    from peft import LoraConfig, get_peft_model

    def lora() -> LoraConfig:
        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                          target_modules=list(cfg.target_modules) if cfg.target_modules else None)

    try:
        model = get_peft_model(backbone, lora(), adapter_name=SHARED)
    except ValueError as exc:  # peft: target modules not found in the base model
        raise ValueError(f"--model.encoder.adapter.target_modules {cfg.target_modules}: {exc}") from None
    for name in cfg.adapter_names()[1:]:
        model.add_adapter(name, lora())
    for name, param in model.named_parameters():
        # every adapter trainable, the base frozen; adapters on the unused pooler ("dense" matches it) stay
        # frozen at zero: a trainable parameter without a gradient would hang DDP
        param.requires_grad_("lora_" in name and ".pooler." not in name)
    return model


def adapter_parameters(backbone: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable parameters of adapter ``name`` (``...lora_A.<name>.weight``, ``...lora_B.<name>.weight``)."""
    return [p for n, p in backbone.named_parameters() if "lora_" in n and f".{name}." in n and p.requires_grad]


@contextlib.contextmanager
def use_adapter(backbone: nn.Module, name: str):
    """Run ``backbone`` with adapter ``name`` active, leaving every ``requires_grad`` flag alone.

    peft's ``set_adapter`` also freezes the inactive adapters; training encodes several groups before one
    backward, so every adapter must keep requiring gradients (autograd skips a leaf that no longer does, and
    toggling the flag detaches DeepSpeed ZeRO-2's gradient hooks). The active adapter is therefore set on the
    tuner layers themselves (peft's ``BaseTunerLayer._active_adapter``, what ``set_adapter`` sets); the test
    ``test_language_adapters_route_each_sentence_as_peft_mixed_batches_do`` checks it against peft's own
    mixed-batch inference."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [name]
    try:
        yield
    finally:
        for m, active in zip(layers, previous):
            m._active_adapter = active


def routed_forward(encoder: "DualEncoder", batch: "Batch", inputs_embeds: Tensor | None = None) -> Tensor:
    """``(N, D)`` embeddings, each sentence through its language's adapter (one forward per adapter present).

    In training, every adapter absent from the batch joins the graph with a zero contribution, so that all
    trainable parameters get a gradient (DDP and GradCache's all-reduce expect the same set on every rank)."""
    cfg = encoder.adapter_config
    names = [cfg.adapter_of(lang) for lang in batch.languages]  # per vocabulary entry
    per_sentence = [names[i] for i in batch.lang_ids.tolist()]  # host sync: the groups' sizes
    out = None
    for name in cfg.adapter_names():
        index = [i for i, n in enumerate(per_sentence) if n == name]
        if not index:
            continue
        rows = torch.tensor(index, dtype=torch.long, device=batch.input_ids.device)
        embeds = inputs_embeds[rows] if inputs_embeds is not None else None
        with use_adapter(encoder.backbone, name):
            emb = encoder.encode(batch.input_ids[rows], batch.attention_mask[rows], inputs_embeds=embeds)
        out = emb.new_zeros(batch.num_sentences, emb.shape[1]) if out is None else out
        out = out.index_copy(0, rows, emb)  # (N, D), differentiable w.r.t. emb
    if out is None:  # an empty batch
        out = encoder.encode(batch.input_ids, batch.attention_mask)
    if encoder.training:
        present = set(per_sentence)
        unused = [p for name in cfg.adapter_names() if name not in present
                  for p in adapter_parameters(encoder.backbone, name) if p.requires_grad]
        if unused:
            out = out + 0.0 * sum(p.sum() for p in unused)
    return out


class AdapterFreeReference:
    """The drift reference of an adapted encoder: the same backbone with its adapters switched off.

    Shares every backbone weight with the trained encoder (no second copy); only the projection head, which
    trains with the adapters, is copied at construction (``H x D`` floats). Always evaluated without dropout
    and without gradients. Has the calling interface ``encode_grouped`` uses (``__call__``, ``token_embeddings``).
    """

    def __init__(self, encoder: "DualEncoder"):
        self.encoder = encoder
        self.projection = copy.deepcopy(encoder.projection).requires_grad_(False) if encoder.projection else None

    def to(self, *args, **kwargs) -> "AdapterFreeReference":
        if self.projection is not None:
            self.projection.to(*args, **kwargs)
        return self

    def token_embeddings(self, input_ids: Tensor) -> Tensor | None:
        return self.encoder.token_embeddings(input_ids)

    @torch.no_grad()
    def __call__(self, batch: "Batch", inputs_embeds: Tensor | None = None) -> Tensor:
        encoder = self.encoder
        was_training, projection = encoder.training, encoder.projection
        # peft's disable_adapter freezes every adapter and, on exit, unfreezes only the active one: the
        # flags are restored as they were (language adapters: all trainable)
        flags = [(p, p.requires_grad) for p in encoder.backbone.parameters()]
        encoder.eval()
        try:
            if projection is not None:
                encoder.projection = self.projection
            with encoder.backbone.disable_adapter():
                return encoder.encode(batch.input_ids, batch.attention_mask, inputs_embeds=inputs_embeds)
        finally:
            if projection is not None:
                encoder.projection = projection
            encoder.train(was_training)
            for p, flag in flags:
                p.requires_grad_(flag)


# --------------------------------------------------------------------------- export


def merged_copy(encoder: "DualEncoder", name: str = SHARED) -> "DualEncoder":
    """A plain ``DualEncoder`` copy (no peft) whose backbone has adapter ``name`` folded into its weights."""
    plain = copy.deepcopy(encoder)
    plain.backbone.base_model.set_adapter(name)
    plain.backbone = plain.backbone.merge_and_unload(adapter_names=[name])
    plain.adapter_config = AdapterConfig()
    return plain.eval()


def check_exportable(encoder: "DualEncoder", how: str, flag: str = "--adapter") -> None:
    if how not in EXPORT_ADAPTERS:
        raise ValueError(f"{flag} must be one of {', '.join(EXPORT_ADAPTERS)}, got {how!r}")
    if how == "peft" and not base_reloads(encoder.source_name_or_path):
        raise ValueError(
            f"{flag} peft writes only the adapter, and the base {encoder.source_name_or_path!r} does not load by "
            f"name (a random-weight model): use {flag} merge"
        )


TINY = "tiny"
"""``--model.encoder.name_or_path tiny``: the random debug encoder built from config (defined here, below
:mod:`alignment.model`, which re-exports it)."""


def base_reloads(name_or_path: str | None) -> bool:
    """Whether the base encoder can be reloaded by name (not the random ``tiny`` debug model)."""
    return bool(name_or_path) and name_or_path != TINY


def save_peft_folder(encoder: "DualEncoder", directory: Path) -> None:
    """Write the adapters as a peft folder (``adapter_config.json``, ``adapter_model.safetensors``; language
    adapters in sub-folders named after them), pointing at the base by its name or path."""
    backbone = encoder.backbone
    for config in backbone.peft_config.values():
        config.base_model_name_or_path = str(encoder.source_name_or_path)
    backbone.save_pretrained(str(directory))


def write_language_router(encoder: "DualEncoder", directory: Path, *, tokenizer, max_seq_length: int,
                          prompts: dict[str, str] | None) -> None:
    """A sentence-transformers folder whose first module is a ``Router`` with one merged encoder per adapter.

    ``SentenceTransformer(directory).encode(texts, task=<language code>)`` encodes with that language's
    adapter; a language outside ``language_groups`` (or no ``task``) takes the ``default`` adapter, as in
    training. Each route is a full merged copy of the backbone (size: adapters x backbone)."""
    import tempfile

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Router, Transformer

    cfg = encoder.adapter_config
    routes = {}
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        for name in cfg.adapter_names():
            folder = Path(scratch) / name
            merged_copy(encoder, name).backbone.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
            routes[name] = [Transformer(str(folder), max_seq_length=max_seq_length)]
        mappings = {(lang, None): name for lang, name in cfg.language_groups.items()}
        mappings[(None, None)] = SHARED  # no task, or a language without an adapter
        router = Router(routes, default_route=SHARED, route_mappings=mappings)
        modules: list[nn.Module] = [router, Pooling(encoder.backbone.config.hidden_size,
                                                    pooling_mode=ST_POOLING[encoder.pooling])]
        if encoder.projection is not None:
            proj = encoder.projection
            dense = Dense(proj.in_features, proj.out_features, bias=False, activation_function=nn.Identity())
            dense.linear.weight.data.copy_(proj.weight.detach().cpu())
            modules.append(dense)
        if encoder.normalize:
            modules.append(Normalize())
        model = SentenceTransformer(modules=modules, device="cpu", prompts={k: v for k, v in (prompts or {}).items() if v})
        model.save(str(directory))


def keep_trainable(checkpoint: dict, module: nn.Module) -> None:
    """``--model.encoder.adapter.checkpoint_adapter_only``: drop the frozen weights from a checkpoint's state
    dict (they reload from --model.encoder.name_or_path) and mark it (:data:`ADAPTER_ONLY`)."""
    state = checkpoint.get("state_dict")
    if state is None:  # DeepSpeed writes its own files: nothing to filter here
        return
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}
    checkpoint[ADAPTER_ONLY] = True
