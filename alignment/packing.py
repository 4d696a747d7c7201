"""Unpadded (packed) encoding of a step's sentences: one sequence, variable-length attention.

The length-grouped path (``alignment/encode.py``) still pads each chunk to its own longest sentence. Here
every real token of the step goes into ONE sequence and attention is cut per sentence by the kernel::

    (N, T) + mask --keep real tokens--> (1, S) ids, S = sum of lengths, no padding at all
        position_ids restart per sentence (BERT 0..len-1; XLM-R/RoBERTa padding_idx+1..: the padded forward's)
        cu_seq_lens (N+1,) int32, max_length --backbone kwargs--> the attention kernel's varlen call
        --> (1, S, H) --pool per segment (mean / first token / last token)--> (N, H) in batch order
        --DualEncoder.head (projection, normalise)--> (N, D)

The backbone (BERT, XLM-R in transformers 5) forwards ``position_ids`` and the ``cu_seq_lens_q/k`` and
``max_length_q/k`` keyword arguments to its attention function; a kernel with a variable-length path uses
them, SDPA and eager ignore them (they would attend across sentences), so the packed path runs only with:

- ``flash_attention_2`` / ``flash_attention_3`` / a ``kernels-community`` flash kernel (transformers'
  ``_flash_attention_forward`` calls ``flash_attn_varlen_func`` with them; needs the flash-attn package or the
  hub kernel, CUDA);
- ``sdpa_varlen``, registered here (:func:`register_kernel`): on CUDA in bf16/fp16 with no attention dropout,
  ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own flash kernel: no extra package); otherwise, and on
  CPU, the exact reference (a block-diagonal mask from ``cu_seq_lens`` and SDPA, quadratic in S: for tests and
  ``--model.step.unpadded on``). Without the packing keywords (the padded path, export, evaluation) it is
  transformers' SDPA, the same numbers as ``attn_implementation sdpa``.

``--model.step.unpadded``: ``auto`` packs where a fast varlen kernel applies (CUDA, a kernel above) and
otherwise takes the length-grouped path, saying once which path runs and why; ``on`` packs wherever the kernel
consumes packed input (the exact reference included) and refuses, naming the flag and the reason, where it
does not; ``off`` never packs. Embeddings and gradients equal the padded forward's (float64 on CPU:
``tests/unit/test_packing.py``; bf16 on GPU: ``tests/gpu/test_gpu_packing.py``).

Knows nothing of Lightning or ranks: ``model`` is a ``DualEncoder`` (or its frozen drift reference).
"""

from __future__ import annotations

import os
import sys
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from alignment.batch import Batch
from alignment.encode import PaddingStats, encode_grouped, right_padded

Unpadded = Literal["auto", "off", "on"]
UNPADDED: tuple[str, ...] = get_args(Unpadded)
KERNEL = "sdpa_varlen"
"""Name of the attention kernel registered by :func:`register_kernel` (``--model.encoder.attn_implementation``)."""
PACKABLE = frozenset({"bert", "xlm-roberta"})
"""Backbones whose packed forward is tested equal to the padded one (their attention receives the varlen keywords)."""
FLAG = "--model.step.unpadded"

_said: set[str] = set()


def say_once(message: str) -> None:
    """Print ``message`` once per process (global rank 0, to stderr): which encoding path the step takes and why."""
    if message in _said:
        return
    _said.add(message)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"[unpadded] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the sdpa_varlen kernel


def _reference_varlen(query: Tensor, key: Tensor, value: Tensor, cu_seq_lens: Tensor, dropout: float,
                      scaling: float | None) -> Tensor:
    """Exact attention of packed ``(1, heads, S, d)`` inputs within each ``cu_seq_lens`` segment: SDPA with a
    block-diagonal mask (``(S, S)`` booleans: quadratic memory). Returns ``(1, S, heads, d)``."""
    total = query.shape[2]
    segment = torch.bucketize(torch.arange(total, device=query.device), cu_seq_lens[1:].to(query.device),
                              right=True)  # (S,) the sentence of each token
    mask = segment.unsqueeze(0) == segment.unsqueeze(1)  # (S, S)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()


def fast_varlen(query: Tensor, dropout: float) -> bool:
    """Whether ``sdpa_varlen`` runs PyTorch's flash varlen kernel (CUDA, half precision, no attention dropout)."""
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.9)
    except ImportError:
        return False
    return True


def sdpa_varlen_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers attention function ``sdpa_varlen``: packed input (``cu_seq_lens_q`` given) attends within
    each sentence; anything else is transformers' SDPA unchanged."""
    cu_q, cu_k = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
    max_q, max_k = kwargs.pop("max_length_q", None), kwargs.pop("max_length_k", None)
    if cu_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("sdpa_varlen: packed input is one sequence (batch 1) without an attention mask")
    if fast_varlen(query, dropout):
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (S, heads, d)
        out = varlen_attn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), scale=scaling)  # (S, heads, d)
        return out.unsqueeze(0), None
    return _reference_varlen(query, key, value, cu_q, dropout, scaling), None


def register_kernel() -> None:
    """Register ``sdpa_varlen`` with transformers (attention function + SDPA's padding mask); idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(KERNEL, sdpa_varlen_attention)
    AttentionMaskInterface.register(KERNEL, sdpa_mask)


# --------------------------------------------------------------------------- support


def kernel_of(model) -> str:
    return str(getattr(getattr(getattr(model, "backbone", None), "config", None), "_attn_implementation", None))


def varlen_kernel(kernel: str) -> bool:
    """Whether attention kernel ``kernel`` consumes the packed keywords (``cu_seq_lens_q/k``, ``max_length_q/k``)."""
    return kernel == KERNEL or kernel.startswith("flash_attention_") or "flash-attn" in kernel or "flash_attn" in kernel


def static_reason(model) -> str | None:
    """Why ``model`` cannot encode packed input whatever the device (None when it can)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "head"):
        return f"{type(model).__name__} is not a DualEncoder"
    if getattr(model, "pivot_backbone", None) is not None:
        return "a separate pivot tower (--model.encoder.share_encoder false) is not packed"
    if getattr(getattr(model, "adapter_config", None), "enabled", False):
        return "peft adapters (--model.encoder.adapter.method) are not packed"
    model_type = getattr(backbone.config, "model_type", None)
    if model_type not in PACKABLE:
        return f"backbone {model_type!r} is not one of the packed-tested {', '.join(sorted(PACKABLE))}"
    kernel = kernel_of(model)
    if not varlen_kernel(kernel):
        return (f"--model.encoder.attn_implementation {kernel} has no variable-length path (it would attend across "
                f"sentences): use {KERNEL} (PyTorch's varlen flash kernel on CUDA) or flash_attention_2")
    return None


def fast_reason(model, device: torch.device) -> str | None:
    """Why the packed path would not run a fast varlen kernel on ``device`` (None when it would)."""
    if device.type != "cuda":
        return f"no CUDA ({device.type}): packed attention would run the exact quadratic reference"
    if kernel_of(model) != KERNEL:
        return None  # flash_attention_* / hub kernels: CUDA varlen with dropout and any half precision
    half = torch.is_autocast_enabled("cuda") or next(model.backbone.parameters()).dtype in (torch.float16,
                                                                                              torch.bfloat16)
    if not half:
        return f"{KERNEL} needs bf16/fp16 on CUDA (--trainer.precision bf16-mixed): fp32 would run the reference"
    dropout = float(getattr(model.backbone.config, "attention_probs_dropout_prob", 0.0) or 0.0)
    if model.training and dropout > 0:
        return (f"{KERNEL} (torch varlen_attn) has no attention dropout and the backbone's "
                f"attention_probs_dropout_prob is {dropout}: set --model.encoder.attention_dropout 0, or use "
                "flash_attention_2")
    return None


def check_unpadded(model, unpadded: str) -> None:
    """Refuse ``--model.step.unpadded on`` for a model that cannot pack (before any compute)."""
    if unpadded not in UNPADDED:
        raise ValueError(f"{FLAG} must be one of {', '.join(UNPADDED)}, got {unpadded!r}")
    if unpadded == "on":
        reason = static_reason(model)
        if reason is not None:
            raise ValueError(f"{FLAG} on: cannot pack: {reason}")


def packs(model, batch: Batch, unpadded: str) -> bool:
    """Whether this step's ``batch`` is encoded packed (says once which path runs; raises for ``on`` where
    it cannot)."""
    if unpadded == "off" or batch.num_sentences == 0:
        return False
    reason = static_reason(model)
    if reason is None:
        lengths = batch.attention_mask.sum(dim=1)
        if not right_padded(batch.attention_mask, lengths):
            reason = "the batch is not right-padded (packed positions would differ from the padded forward's)"
        elif int(lengths.min()) == 0:
            reason = "the batch has an empty sentence (an empty segment has no first token)"
    if reason is not None:
        if unpadded == "on":
            raise ValueError(f"{FLAG} on: cannot pack: {reason}")
        say_once(f"length-grouped path (--model.step.token_budget): {reason}")
        return False
    slow = fast_reason(model, batch.input_ids.device)
    if slow is not None and unpadded == "auto":
        say_once(f"length-grouped path (--model.step.token_budget): {slow}")
        return False
    say_once(f"packed path, {kernel_of(model)}" + (f" (exact reference: {slow})" if slow else " (varlen kernel)"))
    return True


# --------------------------------------------------------------------------- the packed forward


def position_offset(backbone) -> int:
    """First position id of a sentence: 0 (BERT), ``padding_idx + 1`` (XLM-R/RoBERTa number from the pad id)."""
    embeddings = getattr(backbone, "embeddings", None)
    if hasattr(embeddings, "create_position_ids_from_input_ids"):
        return int(embeddings.padding_idx) + 1
    return 0


def pool_packed(hidden: Tensor, segment: Tensor, cu_seq_lens: Tensor, how: str) -> Tensor:
    """``(N, H)`` sentence vectors from packed ``(S, H)`` states: ``mean`` over each segment, ``cls`` its first
    token, ``last`` its last token (``alignment.model.pool`` on the padded states)."""
    starts, stops = cu_seq_lens[:-1].long(), cu_seq_lens[1:].long()
    if how == "mean":
        sums = hidden.new_zeros(starts.shape[0], hidden.shape[1]).index_add(0, segment, hidden)  # (N, H)
        return sums / (stops - starts).clamp(min=1).to(hidden.dtype).unsqueeze(1)
    if how == "cls":
        return hidden[starts]
    if how == "last":
        return hidden[stops - 1]
    raise ValueError(f"pooling must be one of mean, cls, last, got {how!r}")


def encode_packed(model, batch: Batch, stats: PaddingStats | None = None) -> Tensor:
    """``(N, D)`` embeddings of a right-padded ``batch`` in batch order, from one packed forward of its real
    tokens (no padding)."""
    mask = batch.attention_mask.bool()  # (N, T)
    lengths = mask.sum(dim=1)  # (N,)
    host = lengths.tolist()  # one device-to-host copy: max_length for the kernel
    cu = torch.zeros(len(host) + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.cumsum(lengths, 0)
    total = sum(host)
    segment = torch.repeat_interleave(torch.arange(len(host), device=mask.device), lengths)  # (S,)
    positions = torch.arange(total, device=mask.device) - cu[:-1].long()[segment]  # restart per sentence
    positions = positions + position_offset(model.backbone)
    longest = max(host)
    hidden = model.backbone(input_ids=batch.input_ids[mask].unsqueeze(0), position_ids=positions.unsqueeze(0),
                            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                            max_length_k=longest).last_hidden_state[0]  # (S, H)
    if stats is not None:
        stats.add(total, total)
    return model.head(pool_packed(hidden, segment, cu, model.pooling))


def encode_step(model, batch: Batch, token_budget: int | None, unpadded: str = "off",
                stats: PaddingStats | None = None) -> Tensor:
    """The step's encoder call: packed (:func:`encode_packed`) where :func:`packs` says so, else length-grouped
    (:func:`alignment.encode.encode_grouped`)."""
    if packs(model, batch, unpadded):
        return encode_packed(model, batch, stats)
    return encode_grouped(model, batch, token_budget, stats)
