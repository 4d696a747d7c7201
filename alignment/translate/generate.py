"""One seq2seq model, loaded once per process, translating lists of sentences fast.

Sentences are tokenised once, sorted by length (longest first: an out-of-memory
error shows in the first batch, not the last) and cut into batches by a *token
budget*: a batch of ``b`` sentences whose longest has ``L`` tokens is allowed
while ``b * L * beams <= batch_tokens`` (beam search keeps ``beams`` copies of
every encoder output and decoder state, so memory grows with that product).
Short sentences thus travel in large batches and long ones in small batches,
with little padding. Generation runs in bf16 (fp16 where bf16 is unsupported)
on GPU and fp32 on CPU, greedy or beam search, never sampling: the output is a
function of the input and the batch it fell in, and batches are a function of
the input only, so reruns reproduce it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from alignment.translate.codes import FAMILIES, LanguageMap, detect_family

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class GenerateConfig:
    """How sentences are batched and decoded (``--generate.beams``, ``--generate.max_length``, ``--generate.batch_tokens``, ...)."""

    beams: int = 4
    """Beam size (1 = greedy)."""
    max_length: int = 256
    """Longest source, in tokens (longer sources are truncated), and most tokens generated per sentence."""
    batch_tokens: int = 16384
    """Token budget of a batch: sentences x longest source x beams; lower it on out-of-memory errors."""
    max_batch: int = 512
    """At most this many sentences per batch, however short."""
    dtype: Dtype = "auto"
    """Weights and activations: auto (bf16 on GPU, fp16 where bf16 is unsupported, fp32 on CPU), bf16, fp16, fp32."""
    device: str = "auto"
    """Torch device: auto (cuda:LOCAL_RANK when a GPU is there, else cpu), cpu, cuda, cuda:1 ..."""

    def __post_init__(self) -> None:
        if self.beams < 1:
            raise ValueError(f"--generate.beams must be >= 1, got {self.beams}")
        if self.max_length < 2:
            raise ValueError(f"--generate.max_length must be >= 2, got {self.max_length}")
        if self.batch_tokens < 1:
            raise ValueError(f"--generate.batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.max_batch < 1:
            raise ValueError(f"--generate.max_batch must be >= 1, got {self.max_batch}")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"--generate.dtype must be one of auto, {', '.join(_DTYPES)}, got {self.dtype!r}")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":  # one GPU per local rank; a task that sees one GPU (CUDA_VISIBLE_DEVICES) takes it
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU unless asked otherwise (half-precision matmuls there are slow and lose digits)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def token_budget_batches(lengths: list[int], *, batch_tokens: int, beams: int, max_batch: int) -> list[list[int]]:
    """Indices grouped into batches: longest first, each within ``batch_tokens`` (a lone sentence always fits).

    Deterministic: ties in length keep input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        length = max(lengths[i], 1)
        grown = max(longest, length)
        if current and ((len(current) + 1) * grown * beams > batch_tokens or len(current) >= max_batch):
            batches.append(current)
            current, longest, grown = [], 0, length
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches


@dataclass
class Throughput:
    """What a process translated, and how fast."""

    sentences: int = 0
    source_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    batches: int = 0
    by_direction: dict[str, int] = field(default_factory=dict)

    def add(self, other: "Throughput") -> None:
        self.sentences += other.sentences
        self.source_tokens += other.source_tokens
        self.generated_tokens += other.generated_tokens
        self.seconds += other.seconds
        self.batches += other.batches
        for key, n in other.by_direction.items():
            self.by_direction[key] = self.by_direction.get(key, 0) + n

    @property
    def sentences_per_second(self) -> float:
        return self.sentences / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"sentences": self.sentences, "source_tokens": self.source_tokens,
                "generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 3),
                "batches": self.batches, "sentences_per_second": round(self.sentences_per_second, 2),
                "by_direction": dict(sorted(self.by_direction.items()))}


class Translator:
    """A Hugging Face ``AutoModelForSeq2SeqLM`` and its tokenizer, loaded once, with the family's code map.

    Args:
        model: a folder or hub name (offline: a folder).
        family: one of :data:`~alignment.translate.codes.FAMILIES`, or None to detect it.
    """

    def __init__(self, model: str, config: GenerateConfig, *, family: str | None = None, local_rank: int = 0) -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.name = str(model)
        self.config = config
        self.device = resolve_device(config.device, local_rank)
        self.dtype = resolve_dtype(config.dtype, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.name)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(self.name, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"--model {self.name}: cannot load a seq2seq model and tokenizer ({exc})") from exc
        self.model.to(self.device).eval().requires_grad_(False)
        if family is not None and family not in FAMILIES:
            raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
        self.family = family or detect_family(self.model.config.model_type, self.tokenizer)
        self.languages = LanguageMap.for_model(self.family, self.name, self.tokenizer)
        self.throughput = Throughput()

    def describe(self) -> dict:
        """The provenance of this model's outputs (goes into every row it translates)."""
        return {"model": self.name, "family": self.family, "beams": self.config.beams,
                "max_length": self.config.max_length}

    def _encode(self, texts: list[str], src_code: str | None, tgt_code: str | None) -> list[list[int]]:
        tok = self.tokenizer
        if self.family == "marian" and tgt_code is not None:
            texts = [f">>{tgt_code}<< {t}" for t in texts]  # a multi-target Marian model's target token
        elif src_code is not None:
            tok.src_lang = src_code  # sets the source-language prefix/suffix tokens
        return tok(texts, truncation=True, max_length=self.config.max_length)["input_ids"]

    def _forced_bos(self, tgt_code: str | None) -> int | None:
        if tgt_code is None or self.family == "marian":
            return None
        if self.family == "m2m100":
            return self.tokenizer.get_lang_id(tgt_code)
        return self.tokenizer.convert_tokens_to_ids(tgt_code)

    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        """``texts`` (in canonical language ``source``) in ``target``, in input order."""
        if not texts:
            return []
        src_code = self.languages.code(source, flag="--source", role="source")
        tgt_code = self.languages.code(target, flag="--targets")
        ids = self._encode(list(texts), src_code, tgt_code)
        forced = self._forced_bos(tgt_code)
        skip = 1 + (forced is not None)  # decoder start token, then the forced target-language token
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        cfg = self.config
        out: list[str] = [""] * len(texts)
        stats = Throughput()
        start = time.perf_counter()
        for batch in token_budget_batches([len(s) for s in ids], batch_tokens=cfg.batch_tokens, beams=cfg.beams,
                                          max_batch=cfg.max_batch):
            longest = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)  # (b, L), right-padded
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            with torch.inference_mode():
                generated = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                    num_beams=cfg.beams, max_new_tokens=cfg.max_length, do_sample=False,
                    forced_bos_token_id=forced, max_length=None,
                )  # (b, T'): decoder start, [target token], text, eos, pad
            generated = generated[:, skip:].cpu()  # host copy: a device sync per batch
            texts_out = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            for row, i in enumerate(batch):
                out[i] = texts_out[row].strip()
            stats.source_tokens += int(mask.sum())
            stats.generated_tokens += int((generated != pad).sum())
            stats.batches += 1
        stats.seconds = time.perf_counter() - start
        stats.sentences = len(texts)
        stats.by_direction[f"{source}->{target}"] = len(texts)
        self.throughput.add(stats)
        return out
