"""GPU-only: packed (unpadded) steps through the CUDA varlen kernels equal the padded forward in bf16.

Skipped, with the reason printed (``pytest -ra``), where CUDA (or, for ``flash_attention_2``, the flash-attn
package) is missing. The CPU twin, in float64 through the exact reference, is ``tests/unit/test_packing.py``.

The encoder is XLM-R base's architecture (12 layers, hidden 768, 12 heads; positions from ``padding_idx + 1``)
with random weights and the small synthetic vocabulary. Under ``bf16-mixed`` autocast (fp32 weights, as
``align fit --trainer.precision bf16-mixed`` trains) the packed forward (``sdpa_varlen``: PyTorch's
``varlen_attn``; ``flash_attention_2``: ``flash_attn_varlen_func``) and transformers' padded SDPA forward are
both compared with the fp32 padded forward:

- embeddings (unit norm): max abs error of the packed path <= 2 x the padded bf16 path's + 2e-3, and <= 2e-2;
- parameter gradients of a fixed linear functional: relative L2 error (all gradients as one vector) of the
  packed path <= 2 x the padded bf16 path's + 1e-2, and <= 5e-2.

bf16 keeps 8 mantissa bits: two bf16 forwards by different kernels differ by about 1e-3 per layer, so the
check is "no worse than the padded bf16 path", not equality. Then ``align fit`` on the GPU packs its steps
(``--model.step.unpadded auto`` + ``sdpa_varlen``), says so, and logs ``train/padding_share`` 0.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from tests import _training as T
from tests.distributed._spawn import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (varlen attention kernels); none here"),
]

DEVICE = "cuda"
EMB_FACTOR, EMB_SLACK, EMB_MAX = 2.0, 2e-3, 2e-2
GRAD_FACTOR, GRAD_SLACK, GRAD_MAX = 2.0, 1e-2, 5e-2


def xlmr_base_shaped(vocab_size: int, pad_token_id: int, **overrides):
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, max_position_embeddings=514,
                            **overrides)  # 12 x 768, 12 heads, 3072: XLM-R base's defaults


@pytest.fixture(scope="module")
def tokenizer():
    from alignment.synthetic import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    """48 rows of up to 4 languages, 1 to 60 words (a few times more padding than tokens in one padded forward)."""
    from alignment.synthetic import rows_to_batch, synthetic_rows

    rows = synthetic_rows(48, T.LANGUAGES, seed=5, missing_prob=0.3, min_words=1, max_words=60)
    return rows_to_batch(tokenizer, list(rows), T.LANGUAGES).to(DEVICE)


def _encoder(config, kernel: str, pooling: str, state=None):
    from alignment.model import DualEncoder

    model = DualEncoder.from_config(config, attn_implementation=kernel, pooling=pooling).to(DEVICE).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def _run(model, batch, packed: bool, bf16: bool):
    from alignment.packing import encode_packed

    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        emb = encode_packed(model, batch) if packed else model(batch)
    weights = torch.linspace(-1, 1, emb.numel(), device=emb.device).reshape(emb.shape)
    (emb.float() * weights).sum().backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return emb.detach().float(), grads


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("kernel", ["sdpa_varlen", "flash_attention_2"])
def test_packed_bf16_matches_the_padded_forward(tokenizer, batch, kernel, pooling, monkeypatch):
    if kernel == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attention_2 needs the flash-attn package, not installed here")
    from alignment.packing import packs

    config = xlmr_base_shaped(len(tokenizer), tokenizer.pad_token_id)
    torch.manual_seed(0)
    reference = _encoder(config, "sdpa", pooling)
    state = reference.state_dict()
    padded, packed = _encoder(config, "sdpa", pooling, state), _encoder(config, kernel, pooling, state)
    assert batch.padding_ratio > 0.3
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert packs(packed, batch, "auto")  # the fast path is what auto picks here
    if kernel == "sdpa_varlen":  # PyTorch's varlen kernel really runs (not the quadratic reference)
        import torch.nn.attention.varlen as varlen

        calls = []
        original = varlen.varlen_attn
        monkeypatch.setattr(varlen, "varlen_attn", lambda *a, **k: calls.append(1) or original(*a, **k))
    emb_ref, grad_ref = _run(reference, batch, packed=False, bf16=False)
    emb_pad, grad_pad = _run(padded, batch, packed=False, bf16=True)
    emb_pack, grad_pack = _run(packed, batch, packed=True, bf16=True)
    if kernel == "sdpa_varlen":
        assert len(calls) == config.num_hidden_layers
    err_pad, err_pack = (float((e - emb_ref).abs().max()) for e in (emb_pad, emb_pack))
    rel_pad, rel_pack = (float((g - grad_ref).norm() / grad_ref.norm()) for g in (grad_pad, grad_pack))
    print(f"{kernel} {pooling}: embeddings max |err| padded bf16 {err_pad:.2e}, packed {err_pack:.2e}; "
          f"gradients rel err padded bf16 {rel_pad:.2e}, packed {rel_pack:.2e}")
    assert err_pack <= EMB_FACTOR * err_pad + EMB_SLACK and err_pack <= EMB_MAX, (err_pack, err_pad)
    assert rel_pack <= GRAD_FACTOR * rel_pad + GRAD_SLACK and rel_pack <= GRAD_MAX, (rel_pack, rel_pad)


RUN_YAML = """\
trainer:
  accelerator: gpu
  devices: 1
  precision: bf16-mixed
  max_steps: 4
  val_check_interval: null
  limit_val_batches: 0
model:
  encoder:
    random_init: true
    attn_implementation: sdpa_varlen
    attention_dropout: 0.0
  step:
    unpadded: auto
  optim: {lr: 2.0e-5, warmup_steps: 1}
data: {batch_size: 32, max_length: 128, num_workers: 1}
"""


def test_align_fit_packs_its_steps_on_the_gpu(tmp_path, tokenizer):
    """The user's path: ``align fit`` on an XLM-R-base-shaped model with XLM-R's attention dropout 0.1, switched
    off by ``--model.encoder.attention_dropout 0`` (torch's varlen kernel has none), packs, says so once, logs
    zero padding, and trains to finite losses."""
    folder = tmp_path / "xlmr-base-shaped"
    xlmr_base_shaped(len(tokenizer), tokenizer.pad_token_id, attention_probs_dropout_prob=0.1).save_pretrained(folder)
    corpus = T.make_corpus(tmp_path / "data", rows=256, rows_per_shard=64)
    (tmp_path / "run.yaml").write_text(RUN_YAML)
    cmd = [sys.executable, "-m", "alignment.cli", "fit", "--config", str(T.DEBUG_YAML),
           "--config", str(tmp_path / "run.yaml"), "--model.encoder.name_or_path", str(folder),
           "--model.encoder.vocab_size", str(corpus.vocab_size),
           "--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer)]
    env = T.align_env(MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("[unpadded]")]
    assert said == ["[unpadded] packed path, sdpa_varlen (varlen kernel)"], said
    rows = T.csv_metrics(tmp_path / "runs" / "debug" / "csv" / "version_0" / "metrics.csv")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    shares = [r["train/padding_share"] for r in rows if "train/padding_share" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
    assert shares and all(abs(s) < 1e-6 for s in shares), json.dumps(shares)

