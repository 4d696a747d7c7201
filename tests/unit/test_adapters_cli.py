"""LoRA and language adapters along the user's path: ``align fit --config`` (+ a resume from an adapter-only
checkpoint), ``align export`` (merged, peft folder, language Router), each export loaded by its ordinary
consumer and compared with the trained encoder's embeddings (rebuilt from the checkpoint: adapters unmerged).

The base is a tiny random BERT saved to a folder (``--model.encoder.name_or_path``): an adapter-only
checkpoint and a peft adapter folder reload it by that path.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from alignment.adapters import ADAPTER_ONLY, use_adapter
from alignment.cli import main
from alignment.export import encoder_from_checkpoint
from alignment.model import DualEncoder, pool
from alignment.synthetic import synthetic_rows
from tests import _training as T

ATOL = 1e-5  # float32, the same weights in another module layout (merged: a different summation order)
REPO_CONFIGS = T.REPO / "configs" / "recipes" / "adapters"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["align"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters-cli")
    corpus = T.make_corpus(root / "data", rows=64, rows_per_shard=32)
    torch.manual_seed(0)
    DualEncoder.from_config(DualEncoder.tiny_config(corpus.vocab_size)).save_pretrained(root / "base")
    return corpus, root / "base"


def _fit(root, corpus, base, monkeypatch, *extra) -> int:
    root.mkdir(parents=True, exist_ok=True)
    (root / "csv.yaml").write_text(T.CSV_ONLY)
    monkeypatch.chdir(root)
    return main(["fit", "--config", str(T.DEBUG_YAML), "--config", "csv.yaml", *extra,
                 "--model.encoder.name_or_path", str(base), "--model.optim.lr", "5e-2",
                 "--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer),
                 "--data.batch_size", "8", "--trainer.limit_val_batches", "0"])


def _texts(language: str) -> list[str]:
    return [r.texts[language] for r in synthetic_rows(8, T.LANGUAGES, seed=11) if language in r.texts]


def test_lora_fit_resume_and_both_exports_give_the_trained_embeddings(tmp_path, corpus, monkeypatch, capsys):
    corpus, base = corpus
    lora = ["--config", str(REPO_CONFIGS / "lora.yaml"), "--checkpoint.every_n_train_steps", "2"]
    assert _fit(tmp_path, corpus, base, monkeypatch, *lora, "--trainer.max_steps", "2") == 0
    ckpt = tmp_path / "runs" / "debug" / "checkpoints" / "last.ckpt"
    first = torch.load(ckpt, map_location="cpu", weights_only=False)
    # only the adapters: no frozen base weight in the checkpoint
    assert first[ADAPTER_ONLY] and first["global_step"] == 2
    assert first["state_dict"] and all(".lora_" in k for k in first["state_dict"])
    # resume from the adapter-only checkpoint: the base reloads from --model.encoder.name_or_path
    assert _fit(tmp_path, corpus, base, monkeypatch, *lora, "--trainer.max_steps", "4", "--ckpt_path", "last") == 0
    last = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    moved = max(float((last["state_dict"][k] - v).abs().max()) for k, v in first["state_dict"].items())
    assert moved > 1e-4  # training went on from the adapters

    assert main(["export", str(ckpt), str(tmp_path / "merged")]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "peft"), "--adapter", "peft"]) == 0

    trained, tokenizer, _ = encoder_from_checkpoint(ckpt)  # the peft-wrapped encoder, adapters unmerged
    texts = [t for lang in T.LANGUAGES for t in _texts(lang)]
    expected = T.encode_texts(trained, tokenizer, texts)
    with trained.backbone.disable_adapter():
        untrained = T.encode_texts(trained, tokenizer, texts)
    assert (expected - untrained).abs().max() > 1e-4  # the adapters matter

    for folder in ("merged", "runs/debug/export"):  # align export, and the end-of-fit export (merge)
        got = SentenceTransformer(str(tmp_path / folder), device="cpu").encode(texts, convert_to_tensor=True)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m, f=folder: f"{f}: {m}")

    # the peft folder, as peft loads it, plus the project's pooling and normalisation
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base)), str(tmp_path / "peft")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "peft"))
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    got = F.normalize(pool(hidden, enc["attention_mask"], "mean"), dim=-1)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # align eval / align mine load an export with DualEncoder.from_pretrained (transformers applies the adapter)
    loaded = DualEncoder.from_pretrained(tmp_path / "peft")
    torch.testing.assert_close(T.encode_texts(loaded, tok, texts), expected, atol=ATOL, rtol=0)

    # ONNX of the LoRA-merged model: onnxruntime's embeddings = the trained (unmerged) encoder's, max abs <= 1e-4
    import onnxruntime as ort

    assert main(["export", str(ckpt), str(tmp_path / "onnx"), "--format", "onnx", "--onnx_int8", "false"]) == 0
    session = ort.InferenceSession(str(tmp_path / "onnx" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = tok(texts, padding=True, return_tensors="np")
    (got,) = session.run(["sentence_embedding"], {k: batch[k] for k in ("input_ids", "attention_mask")})
    assert float((torch.from_numpy(got) - expected).abs().max()) <= 1e-4
    capsys.readouterr()
    # a peft adapter folder carries no ONNX graph: refused with the reason
    assert main(["export", str(ckpt), str(tmp_path / "peft-onnx"), "--adapter", "peft", "--format", "onnx"]) != 0
    assert "--format onnx and --maps apply to a plain (merged) export" in capsys.readouterr().err


def test_language_adapters_export_a_router_chosen_by_language(tmp_path, corpus, monkeypatch):
    corpus, base = corpus
    groups = "{de: germanic, fr: romance, es: romance}"
    assert _fit(tmp_path, corpus, base, monkeypatch, "--config", str(REPO_CONFIGS / "language-adapters.yaml"),
                "--model.encoder.adapter.language_groups", groups, "--trainer.max_steps", "3", "--export.dir", "") == 0
    ckpt = tmp_path / "runs" / "debug" / "checkpoints" / "last.ckpt"
    assert main(["export", str(ckpt), str(tmp_path / "cli-export")]) == 0
    trained, tokenizer, _ = encoder_from_checkpoint(ckpt)
    groups_of = trained.adapter_config.language_groups

    def expected(texts, adapter):
        with use_adapter(trained.backbone, adapter):
            return T.encode_texts(trained, tokenizer, texts)

    for folder in ("cli-export",):  # the end-of-fit export writes the same Router (test_lora_...: the same call)
        model = SentenceTransformer(str(tmp_path / folder), device="cpu")
        for lang in T.LANGUAGES:
            texts = _texts(lang)
            got = model.encode(texts, task=lang, convert_to_tensor=True)
            want = expected(texts, groups_of.get(lang, "default"))
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, f=folder, la=lang: f"{f} {la}: {m}")
        # German through its own adapter differs from German through the shared one
        de = _texts("de")
        assert (expected(de, "germanic") - expected(de, "default")).abs().max() > 1e-4
        with pytest.raises(ValueError, match="language-adapter export"):  # align eval: one encoder per adapter
            DualEncoder.from_pretrained(tmp_path / folder)
        # documented: a language without an adapter (or no task) takes the shared adapter "default"
        for task in ("sw", None):
            got = model.encode(de, task=task, convert_to_tensor=True) if task else model.encode(de, convert_to_tensor=True)
            torch.testing.assert_close(got, expected(de, "default"), atol=ATOL, rtol=0)


def test_warm_start_from_an_adapter_only_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    """``--warm_start`` of a ``checkpoint_adapter_only`` checkpoint: the base from --model.encoder.name_or_path, the
    adapters from the checkpoint (the new run, at a negligible learning rate, exports the checkpoint's embeddings:
    max abs difference <= 1e-4); a different adapter config is refused, naming the flag."""
    corpus, base = corpus
    lora = ["--config", str(REPO_CONFIGS / "lora.yaml")]
    assert _fit(tmp_path / "a", corpus, base, monkeypatch, *lora, "--trainer.max_steps", "2", "--export.dir", "") == 0
    ckpt = tmp_path / "a" / "runs" / "debug" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)[ADAPTER_ONLY]

    def warm(*extra):
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / "csv.yaml").write_text(T.CSV_ONLY)
        monkeypatch.chdir(tmp_path / "b")
        return main(["fit", "--config", str(T.DEBUG_YAML), "--config", "csv.yaml", *lora, "--warm_start", str(ckpt),
                     "--model.encoder.name_or_path", str(base), "--data.train_shards", str(corpus.shards),
                     "--data.tokenizer", str(corpus.tokenizer), "--data.batch_size", "8",
                     "--trainer.limit_val_batches", "0", "--trainer.max_steps", "1", *extra])  # fmt: skip

    assert warm("--model.optim.lr", "1e-12") == 0
    trained, tokenizer, _ = encoder_from_checkpoint(ckpt)
    texts = [t for lang in T.LANGUAGES for t in _texts(lang)]
    expected = T.encode_texts(trained, tokenizer, texts)
    got = SentenceTransformer(str(tmp_path / "b" / "runs" / "debug" / "export"), device="cpu").encode(
        texts, convert_to_tensor=True)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with trained.backbone.disable_adapter():
        assert (T.encode_texts(trained, tokenizer, texts) - expected).abs().max() > 1e-3  # the adapters came along
    capsys.readouterr()
    assert warm("--model.encoder.adapter.r", "4", "--trainer.default_root_dir", str(tmp_path / "c")) != 0
    assert "--model.encoder.adapter.r: checkpoint 8, config 4" in capsys.readouterr().err
