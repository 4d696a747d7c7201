"""peft LoRA and language adapters on the encoder (``alignment/adapters.py``), in process.

The adapters' ``lora_B`` matrices start at zero in peft (an adapter is the identity until trained); the tests
draw them at random so that every adapter changes the embeddings and every adapter parameter gets a gradient.
End to end through ``align fit`` / ``align export``: ``test_adapters_cli.py``; DDP: ``tests/distributed``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignment.adapters import SHARED, AdapterConfig, AdapterFreeReference, adapter_parameters
from alignment.encode import encode_grouped
from alignment.model import DualEncoder, ModelConfig, pool
from alignment.synthetic import rows_to_batch, synthetic_rows, tiny_tokenizer
from tests import _training as T

ATOL = 1e-6
TARGETS = ["query", "key", "value", "dense"]
GROUPS = {"de": "germanic", "fr": "romance", "es": "romance"}  # en: the shared adapter "default"


def randomize_lora(module: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    return rows_to_batch(tokenizer, list(synthetic_rows(6, T.LANGUAGES, seed=3, missing_prob=0.2)), T.LANGUAGES)


def encoder(tokenizer, **adapter) -> DualEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path="tiny", vocab_size=len(tokenizer), projection_dim=16,
                      adapter=AdapterConfig(method="lora", target_modules=TARGETS, **adapter))
    enc = DualEncoder.from_model_config(cfg)
    randomize_lora(enc)
    return enc


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(method="lora", r=0), "--model.encoder.adapter.r must be >= 1"),
    (dict(method="none", language_groups={"de": "g"}), "--model.encoder.adapter.language_groups needs"),
    (dict(method="lora", language_groups={"de": "default"}), "--model.encoder.adapter.language_groups: adapter name"),
    (dict(method="lora", target_modules=[]), "--model.encoder.adapter.target_modules must name"),
])
def test_bad_adapter_settings_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_adapter_only_checkpoints_need_a_base_that_reloads():
    with pytest.raises(ValueError, match="--model.encoder.adapter.checkpoint_adapter_only needs a base"):
        ModelConfig(name_or_path="tiny", vocab_size=10, adapter={"method": "lora", "checkpoint_adapter_only": True})


def test_unknown_target_module_is_named(tokenizer):
    cfg = ModelConfig(name_or_path="tiny", vocab_size=len(tokenizer), adapter={"method": "lora",
                                                                              "target_modules": ["qkv_proj"]})
    with pytest.raises(ValueError, match="--model.encoder.adapter.target_modules"):
        DualEncoder.from_model_config(cfg)


def test_lora_trains_only_the_adapters_and_the_projection(tokenizer):
    enc = encoder(tokenizer)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projection.") for n in trainable)
    # rank 8 on 4 kinds of linear layers (dense: attention output, intermediate, output) x 2 layers
    assert any(".query.lora_A.default." in n for n in trainable) and any("output.dense.lora_B" in n for n in trainable)


def test_drift_reference_is_the_adapter_free_base_without_a_second_copy(tokenizer, batch):
    """The reference gives the starting model's embeddings (adapters off = the pretrained weights, the
    starting projection) while the adapters train, and shares every backbone tensor with the encoder."""
    torch.manual_seed(0)
    start = DualEncoder.from_model_config(ModelConfig(name_or_path="tiny", vocab_size=len(tokenizer),
                                                      projection_dim=16)).eval()
    with torch.no_grad():
        expected = start(batch)
    enc = encoder(tokenizer).train()  # same seed: the same base weights and projection, LoRA B random
    reference = enc.frozen_copy()
    assert isinstance(reference, AdapterFreeReference)
    with torch.no_grad():
        enc.projection.weight.add_(0.1)  # the projection trains too: the reference keeps the starting one
    adapted = enc(batch)
    assert (adapted - expected).abs().max() > 1e-2  # the adapters change the embeddings
    torch.testing.assert_close(reference(batch), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(encode_grouped(reference, batch, token_budget=24), expected, atol=ATOL, rtol=0)
    assert enc.training  # the reference's eval-mode forward leaves the encoder's mode as it was
    # storage: the reference holds no backbone tensor of its own, only the projection's H x D copy
    encoder_storages = {p.untyped_storage().data_ptr() for p in enc.parameters()}
    own = list(reference.projection.parameters())
    assert reference.encoder is enc and sum(p.numel() for p in own) == 32 * 16
    assert not {p.untyped_storage().data_ptr() for p in own} & encoder_storages


def _mixed_batch_reference(enc: DualEncoder, batch) -> torch.Tensor:
    """peft's own multi-adapter inference: one forward, ``adapter_names=`` per sentence."""
    names = [GROUPS.get(batch.languages[i], SHARED) for i in batch.lang_ids.tolist()]
    with torch.no_grad():
        hidden = enc.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              adapter_names=names).last_hidden_state
        return F.normalize(enc.projection(pool(hidden, batch.attention_mask, "mean")), dim=-1)


def test_language_adapters_route_each_sentence_as_peft_mixed_batches_do(tokenizer, batch):
    enc = encoder(tokenizer, language_groups=GROUPS).eval()
    with torch.no_grad():
        routed = enc(batch)
        grouped = encode_grouped(enc, batch, token_budget=24)  # length-grouped chunks, each routed
    expected = _mixed_batch_reference(enc, batch)
    torch.testing.assert_close(routed, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(grouped, expected, atol=ATOL, rtol=0)
    # the groups' adapters differ: German through "germanic" is not German through "default"
    with enc.backbone.disable_adapter(), torch.no_grad():
        base = enc(batch)
    assert (routed - base).abs().max() > 1e-2


def test_each_adapter_gets_gradients_from_its_languages_only(tokenizer, batch):
    enc = encoder(tokenizer, language_groups=GROUPS).train()
    for m in enc.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    emb = enc(batch)
    german = batch.lang_ids == batch.languages.index("de")
    emb[german].sum().backward()
    norms = {name: sum(float(p.grad.abs().sum()) for p in adapter_parameters(enc.backbone, name))
             for name in ("default", "germanic", "romance")}
    assert norms["germanic"] > 0 and norms["default"] == 0 and norms["romance"] == 0
    # every adapter parameter has a gradient (zeros for unused ones): DDP and GradCache need the same set
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_peft_export_of_a_random_base_is_refused_before_writing(tokenizer, tmp_path):
    from alignment.export import export_encoder

    with pytest.raises(ValueError, match="--adapter peft writes only the adapter, and the base None"):
        export_encoder(encoder(tokenizer), tmp_path / "out", tokenizer=tokenizer, adapter="peft")
    assert not (tmp_path / "out").exists()


def test_the_drift_reference_leaves_every_language_adapter_trainable(tokenizer, batch):
    """peft's ``disable_adapter`` re-enables only the active adapter on exit; the reference restores all."""
    enc = encoder(tokenizer, language_groups=GROUPS).train()
    before = {n for n, p in enc.named_parameters() if p.requires_grad}
    enc.frozen_copy()(batch)
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == before
    assert any(".germanic." in n for n in before) and any(".romance." in n for n in before)
