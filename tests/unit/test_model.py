"""DualEncoder: pooling, projection, normalisation, freezing, checkpointing, saving."""

from __future__ import annotations

import json

import pytest
import torch

from alignment.batch import Batch
from alignment.model import ENCODER_META, DualEncoder, ModelConfig, pool
from alignment.synthetic import rows_to_batch, synthetic_rows, tiny_tokenizer

LANGUAGES = ("de", "en", "es", "fr")  # sorted canonical codes, as the data pipeline emits


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(LANGUAGES)


def make_batch(tokenizer, n_rows=4, seed=0, missing_prob=0.3) -> Batch:
    """Tokenise synthetic rows into the flat Batch the model consumes."""
    rows = synthetic_rows(n_rows, LANGUAGES, seed=seed, missing_prob=missing_prob)
    return rows_to_batch(tokenizer, rows, LANGUAGES)


def tiny(tokenizer, seed=0, **knobs) -> DualEncoder:
    torch.manual_seed(seed)
    attn = knobs.pop("attn_implementation", None)
    config_overrides = knobs.pop("config", {})
    config = DualEncoder.tiny_config(len(tokenizer), **config_overrides)
    return DualEncoder.from_config(config, attn_implementation=attn, **knobs)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
@pytest.mark.parametrize("projection_dim", [None, 16])
def test_encode_shape_and_unit_norm(tokenizer, pooling, projection_dim):
    model = tiny(tokenizer, pooling=pooling, projection_dim=projection_dim).eval()
    batch = make_batch(tokenizer)
    emb = model(batch)
    assert emb.shape == (batch.num_sentences, projection_dim or 32)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(batch.num_sentences))
    assert model.embedding_dim == emb.shape[1]


def test_normalize_off_keeps_raw_norms(tokenizer):
    model = tiny(tokenizer, normalize=False).eval()
    norms = model(make_batch(tokenizer)).norm(dim=-1)
    assert (norms - 1).abs().max() > 1e-2


@pytest.mark.parametrize("side", ["right", "left"])
def test_pool_against_per_sentence_computation(side):
    torch.manual_seed(0)
    lengths = [5, 2, 7]
    hidden = torch.randn(3, 7, 4)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, 7 - n :] = 1
    for i, n in enumerate(lengths):
        real = hidden[i, mask[i].bool()]  # (n, 4)
        assert real.shape[0] == n
        torch.testing.assert_close(pool(hidden, mask, "mean")[i], real.mean(0))
        torch.testing.assert_close(pool(hidden, mask, "cls")[i], real[0])
        torch.testing.assert_close(pool(hidden, mask, "last")[i], real[-1])


def test_padding_does_not_change_a_sentence_embedding(tokenizer):
    """A sentence encodes the same alone and padded next to a longer one."""
    model = tiny(tokenizer).eval()
    short = synthetic_rows(1, LANGUAGES, seed=1, min_words=3, max_words=3)[0].texts["en"]
    long = synthetic_rows(1, LANGUAGES, seed=2, min_words=12, max_words=12)[0].texts["en"]
    texts = [short, long]
    alone = tokenizer(texts[:1], return_tensors="pt")
    both = tokenizer(texts, padding=True, return_tensors="pt")
    assert both["attention_mask"][0].sum() < both["attention_mask"].shape[1]
    with torch.no_grad():
        a = model.encode(alone["input_ids"], alone["attention_mask"])
        b = model.encode(both["input_ids"], both["attention_mask"])
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)


def test_forward_encodes_all_languages_in_one_backbone_call(tokenizer):
    model = tiny(tokenizer).eval()
    batch = make_batch(tokenizer)
    calls = []
    model.backbone.register_forward_hook(lambda mod, args, kwargs_out: calls.append(1))
    emb = model(batch)
    assert len(calls) == 1
    torch.testing.assert_close(emb, model.encode(batch.input_ids, batch.attention_mask))


def test_freeze_embeddings_and_first_layers(tokenizer):
    model = tiny(tokenizer, freeze_embeddings=True, freeze_layers=1)
    model(make_batch(tokenizer)).sum().backward()
    layers = model.backbone.encoder.layer
    assert model.backbone.get_input_embeddings().weight.grad is None
    assert all(p.grad is None and not p.requires_grad for p in layers[0].parameters())
    assert all(p.grad is not None for p in layers[1].parameters())
    assert all(not p.requires_grad for p in model.backbone.pooler.parameters())  # unused by every pooling
    with pytest.raises(ValueError, match="--model.encoder.freeze_layers"):
        tiny(tokenizer, freeze_layers=3)


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout(tokenizer):
    batch = make_batch(tokenizer)
    grads = []
    for checkpointing in (False, True):
        model = tiny(tokenizer, gradient_checkpointing=checkpointing).train()
        torch.manual_seed(123)  # same dropout masks
        model(batch).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_sdpa_and_eager_attention_agree(tokenizer):
    batch = make_batch(tokenizer)
    sdpa = tiny(tokenizer, attn_implementation="sdpa").eval()
    eager = tiny(tokenizer, attn_implementation="eager").eval()
    assert sdpa.backbone.config._attn_implementation == "sdpa"
    assert eager.backbone.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(sdpa(batch), eager(batch), atol=1e-5, rtol=1e-5)
    auto = tiny(tokenizer)  # None: SDPA where supported (BERT supports it)
    assert auto.backbone.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("share_encoder", [True, False])
def test_save_and_reload_round_trip(tokenizer, tmp_path, share_encoder):
    model = tiny(tokenizer, pooling="cls", projection_dim=12, normalize=False, share_encoder=share_encoder).eval()
    if not share_encoder:
        with torch.no_grad():  # make the towers differ so a mix-up would show
            model.pivot_backbone.get_input_embeddings().weight.mul_(1.5)
    batch = make_batch(tokenizer)
    model.save_pretrained(tmp_path / "enc")
    meta = json.loads((tmp_path / "enc" / ENCODER_META).read_text())
    assert meta == {"pooling": "cls", "normalize": False, "projection_dim": 12, "share_encoder": share_encoder,
                    "embedding_dim": 12}
    reloaded = DualEncoder.from_pretrained(tmp_path / "enc").eval()
    assert (reloaded.pooling, reloaded.normalize, reloaded.embedding_dim) == ("cls", False, 12)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), model(batch))


def test_model_config_must_match_a_saved_folder(tokenizer, tmp_path):
    tiny(tokenizer, pooling="cls", projection_dim=12).save_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match="--model.encoder.pooling is 'mean' but .* saved with 'cls'"):
        DualEncoder.from_model_config(ModelConfig(name_or_path=str(tmp_path / "enc"), projection_dim=12))
    model = DualEncoder.from_model_config(ModelConfig(name_or_path=str(tmp_path / "enc"), pooling="cls",
                                                      projection_dim=12))
    assert model.pooling == "cls" and model.embedding_dim == 12


def test_fine_tuned_folder_keeps_the_source_card_prefixes(tokenizer, tmp_path):
    """Regression: saving a model loaded from an E5 folder dropped query_prefix/passage_prefix, so the
    fine-tuned encoder was evaluated without the prefix it was trained with."""
    tiny(tokenizer).save_pretrained(tmp_path / "src")
    card = json.loads((tmp_path / "src" / ENCODER_META).read_text())
    card.update(query_prefix="query: ", passage_prefix="passage: ", source="intfloat/multilingual-e5-small")
    (tmp_path / "src" / ENCODER_META).write_text(json.dumps(card))
    model = DualEncoder.from_model_config(ModelConfig(name_or_path=str(tmp_path / "src")))
    model.save_pretrained(tmp_path / "tuned")
    saved = json.loads((tmp_path / "tuned" / ENCODER_META).read_text())
    assert saved == card


def test_frozen_copy_is_independent_and_stays_in_eval(tokenizer):
    model = tiny(tokenizer).train()
    ref = model.frozen_copy()
    assert not any(p.requires_grad for p in ref.parameters())
    ref.train()  # e.g. a parent module switching everything to train mode
    assert not ref.training and not any(m.training for m in ref.modules())
    batch = make_batch(tokenizer)
    before = ref(batch)
    with torch.no_grad():
        model.backbone.get_input_embeddings().weight.add_(1.0)
    torch.testing.assert_close(ref(batch), before)  # deterministic (no dropout) and not shared
    assert not before.requires_grad


def test_separate_pivot_tower_encodes_only_pivot_sentences(tokenizer):
    model = tiny(tokenizer, share_encoder=False).eval()
    batch = make_batch(tokenizer)
    before = model(batch)
    torch.testing.assert_close(before, tiny(tokenizer).eval()(batch))  # the copy starts identical
    with torch.no_grad():
        model.pivot_backbone.get_input_embeddings().weight.mul_(-1.0)
    after = model(batch)
    is_pivot = batch.lang_ids == batch.pivot_lang_id
    torch.testing.assert_close(after[~is_pivot], before[~is_pivot])
    assert (after[is_pivot] - before[is_pivot]).abs().max() > 1e-3


def test_from_model_config_builds_the_tiny_model(tokenizer):
    cfg = ModelConfig(name_or_path="tiny", vocab_size=len(tokenizer), pooling="last", projection_dim=8,
                      freeze_embeddings=True)
    model = DualEncoder.from_model_config(cfg)
    assert model.pooling == "last" and model.embedding_dim == 8
    assert not model.backbone.get_input_embeddings().weight.requires_grad
    assert model.backbone.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"pooling": "max", "vocab_size": 10}, "--model.encoder.pooling must be one of mean, cls, last"),
        ({"projection_dim": 0, "vocab_size": 10}, "--model.encoder.projection_dim"),
        ({}, "--model.encoder.vocab_size is required"),
        ({"vocab_size": 0}, "--model.encoder.vocab_size"),
        ({"freeze_layers": -1, "vocab_size": 10}, "--model.encoder.freeze_layers"),
        ({"name_or_path": ""}, "--model.encoder.name_or_path"),
    ],
)
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        ModelConfig(**kwargs)
