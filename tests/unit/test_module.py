"""The training step under a real CPU ``Trainer``: NaN guard, logging, optimiser groups, input checks, GradCache."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger

from alignment.loggers import ResumableWandbLogger
from alignment.model import ModelConfig
from alignment.module import AlignmentModule, NonFiniteLossError, check_global_batch
from alignment.optim import OptimConfig, param_groups
from tests import _training as T


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return T.make_corpus(tmp_path_factory.mktemp("corpus"), rows=160, rows_per_shard=20)


def _nan_on(module: AlignmentModule, steps: set[int] | None) -> list[int]:
    """Make the loss NaN on the given call numbers (all calls when ``steps`` is None); returns the call log."""
    real = module.loss_fn.forward
    calls: list[int] = []

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(len(calls))
        if steps is None or calls[-1] in steps:
            out = {k: (v * float("nan") if k.endswith("_loss") else v) for k, v in out.items()}
        return out

    module.loss_fn.forward = forward
    return calls


class _WeightWatch(Callback):
    """Records, per batch index, whether any trainable weight changed during that batch."""

    def __init__(self):
        self.changed: dict[int, bool] = {}
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = [p.detach().clone() for p in pl_module.encoder.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = [p.detach() for p in pl_module.encoder.parameters() if p.requires_grad]
        self.changed[batch_idx] = any(not torch.equal(a, b) for a, b in zip(after, self._before))


def test_nonfinite_step_is_skipped_counted_and_logged(corpus, tmp_path):
    module = T.module(corpus, step={"max_nonfinite_steps": 3})
    calls = _nan_on(module, {1})
    watch = _WeightWatch()
    loggers = [CSVLogger(str(tmp_path), name="csv"), ResumableWandbLogger(save_dir=str(tmp_path), project="t")]
    trainer = T.trainer(tmp_path, max_steps=4, logger=loggers, log_every_n_steps=1, callbacks=[watch])
    trainer.fit(module, datamodule=T.datamodule(corpus))
    loggers[1].experiment.finish()

    assert module.nonfinite_total == 1 and module.nonfinite_steps == 0
    assert watch.changed[1] is False, "the NaN step must not touch the weights"
    assert all(watch.changed[i] for i in watch.changed if i != 1)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # Lightning counts a skipped step towards max_steps (and the schedule advances): 4 batches, 3 updates
    assert len(calls) == 4 and trainer.global_step == 4

    csv_rows = T.csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    csv_loss = {int(r["step"]): r["train/loss"] for r in csv_rows if "train/loss" in r}
    assert sorted(csv_loss) == [0, 1, 2, 3]
    assert math.isnan(csv_loss[1]) and all(math.isfinite(csv_loss[s]) for s in (0, 2, 3))
    assert [r["train/nonfinite_steps"] for r in csv_rows if "train/nonfinite_steps" in r] == [0.0, 1.0, 1.0, 1.0]
    grad = {int(r["step"]): r["train/grad_norm"] for r in csv_rows if "train/grad_norm" in r}
    assert all(grad[s] > 0 for s in (0, 2, 3)), grad
    assert math.isnan(grad[1]), f"the skipped step logged a gradient norm ({grad[1]}): step 0's, repeated"

    run_id, history = T.wandb_history(tmp_path)
    assert run_id == (tmp_path / "wandb_run_id.txt").read_text().strip()
    wandb_loss = {r["trainer/global_step"]: r["train/loss"] for r in history if "train/loss" in r}
    assert wandb_loss.keys() == csv_loss.keys()
    for step, value in csv_loss.items():
        assert wandb_loss[step] == pytest.approx(value, rel=1e-6, nan_ok=True)
    assert [r["train/nonfinite_steps"] for r in history if "train/nonfinite_steps" in r] == [0.0, 1.0, 1.0, 1.0]


def test_nonfinite_streak_stops_the_run_with_a_checkpoint(corpus, tmp_path):
    module = T.module(corpus, step={"max_nonfinite_steps": 2})
    _nan_on(module, {2, 3, 4, 5, 6, 7})
    trainer = T.trainer(tmp_path, max_steps=10)
    with pytest.raises(NonFiniteLossError, match="--model.step.max_nonfinite_steps") as exc:
        trainer.fit(module, datamodule=T.datamodule(corpus))
    assert "2 consecutive steps had a NaN or infinite loss" in str(exc.value)
    # skipped steps count as steps: calls 0, 1 trained, 2 skipped, the 2nd NaN in a row is global step 3
    ckpt = tmp_path / "nonfinite-step3.ckpt"
    assert ckpt.is_file() and str(ckpt) in str(exc.value)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3 and saved["alignment_nonfinite_total"] == 2
    for name, p in module.state_dict().items():
        torch.testing.assert_close(saved["state_dict"][name], p, atol=0, rtol=0)


def test_nonfinite_streak_keeps_the_last_good_checkpoint(corpus, tmp_path):
    from alignment.callbacks import AtomicModelCheckpoint

    module = T.module(corpus, step={"max_nonfinite_steps": 3})
    _nan_on(module, {2, 3, 4, 5, 6, 7})
    saver = AtomicModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = T.trainer(tmp_path, max_steps=10, enable_checkpointing=True, callbacks=[saver])
    with pytest.raises(NonFiniteLossError):
        trainer.fit(module, datamodule=T.datamodule(corpus))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2, f"last.ckpt is step {last['global_step']}, inside the NaN streak (from step 3)"
    assert last["alignment_nonfinite_total"] == 0
    assert (tmp_path / "nonfinite-step4.ckpt").is_file()  # the streak's own state, for diagnosis


def test_param_groups_no_decay_on_norms_and_biases(corpus):
    module = T.module(corpus, optim={"weight_decay": 0.1})
    groups = param_groups(module, OptimConfig(lr=1e-3, weight_decay=0.1), num_layers=2)
    by_name = {n: g for g in groups for n in g["names"]}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(by_name) == trainable
    for name, group in by_name.items():
        expect_no_decay = name.endswith("bias") or "LayerNorm" in name
        assert group["weight_decay"] == (0.0 if expect_no_decay else 0.1), name
    assert by_name["encoder.backbone.encoder.layer.0.attention.self.query.weight"]["weight_decay"] == 0.1
    assert all(g["lr"] == 1e-3 for g in groups)


def test_layerwise_lr_decay(corpus):
    module = T.module(corpus, encoder={"projection_dim": 16}, optim={"lr": 1.0, "layer_decay": 0.5})
    groups = param_groups(module, OptimConfig(lr=1.0, layer_decay=0.5), num_layers=2)
    lr = {n: g["lr"] for g in groups for n in g["names"]}
    assert lr["encoder.projection.weight"] == 1.0  # above the encoder: full lr
    assert lr["encoder.backbone.encoder.layer.1.output.dense.weight"] == 0.5  # layer 2 of 2
    assert lr["encoder.backbone.encoder.layer.0.output.dense.weight"] == 0.25  # layer 1 of 2
    assert lr["encoder.backbone.embeddings.word_embeddings.weight"] == 0.125  # embeddings
    # the optimiser the module builds carries these groups and the scheduler scales them together
    trainer = T.trainer(T.Path("/tmp"), max_steps=4)
    module.trainer = trainer
    opt = module.configure_optimizers()["optimizer"]
    assert sorted({g["lr"] for g in opt.param_groups}) == [0.125, 0.25, 0.5, 1.0]


# ---------------------------------------------------------------------------- bad input, before any compute


def test_missing_shards_are_named(corpus, tmp_path):
    module = T.module(corpus)
    data = T.datamodule(corpus, train_shards=str(tmp_path / "no-such-shards"), languages=list(T.LANGUAGES))
    with pytest.raises((ValueError, FileNotFoundError)) as exc:
        T.trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    assert "no-such-shards" in str(exc.value)


def test_model_that_cannot_load_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--model.encoder.name_or_path") as exc:
        AlignmentModule(ModelConfig(name_or_path=str(tmp_path / "not-a-model")))
    assert "not-a-model" in str(exc.value)


def test_single_row_batch_is_refused_before_compute(corpus, tmp_path):
    module = T.module(corpus)
    calls = _nan_on(module, set())  # only counts calls
    with pytest.raises(ValueError, match="--data.batch_size 1 x 1 rank"):
        T.trainer(tmp_path, max_steps=1).fit(module, datamodule=T.datamodule(corpus, batch_size=1))
    assert calls == []
    check_global_batch(1, 2)  # one row per rank on two ranks: each row has one negative


def test_tokenizer_larger_than_the_embedding_table_is_refused(corpus, tmp_path):
    module = AlignmentModule(ModelConfig(name_or_path="tiny", vocab_size=corpus.vocab_size - 100))
    with pytest.raises(ValueError, match="--model.encoder.vocab_size"):
        T.trainer(tmp_path, max_steps=1).fit(module, datamodule=T.datamodule(corpus))


# ---------------------------------------------------------------------------- GradCache


class _FirstStep(Callback):
    """The losses of every step and the gradients handed to the optimiser at the first step."""

    def __init__(self):
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _fit_for_loss(corpus, root, steps, precision="32-true", **gradcache):
    # dropout off: GradCache's second forward must see the same network as its first
    module = T.module(corpus, gradcache=gradcache or None, loss={"learn_temperature": True}, seed=1)
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    probe = _FirstStep()
    T.trainer(root, max_steps=steps, callbacks=[probe], precision=precision).fit(
        module, datamodule=T.datamodule(corpus))
    return module, probe


def test_gradcache_gradients_equal_the_plain_step_and_it_trains(corpus, tmp_path):
    """The gradients Lightning hands the optimiser (float64), not parameters after an AdamW step: Adam's first
    step is about lr * sign(g), blind to a gradient scaled by 2 or by 1/world."""
    plain, plain_probe = _fit_for_loss(corpus, tmp_path / "plain", 1, precision="64-true")
    cached, cached_probe = _fit_for_loss(corpus, tmp_path / "gc", 1, precision="64-true", chunk_size=7)
    assert not cached.automatic_optimization
    assert cached_probe.losses[0] == pytest.approx(plain_probe.losses[0], rel=1e-12)
    expected = plain_probe.grads
    assert cached_probe.grads.keys() == expected.keys() and "loss_fn.log_temperature" in expected
    scale = max(float(g.abs().max()) for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(cached_probe.grads[name], grad, rtol=1e-9, atol=1e-9 * scale, msg=name)
    _, probe = _fit_for_loss(corpus, tmp_path / "gc3", 4, chunk_size=7)
    assert len(probe.losses) == 4 and all(math.isfinite(v) for v in probe.losses)


def test_skipped_samples_are_logged_by_reason(corpus, tmp_path):
    """Every skip reason is logged on logging steps (zeros included, so ranks log the same keys and the
    summed all-reduce pairs up), with the run's cumulative count."""
    import json

    import webdataset as wds

    from alignment.batch import SKIP_REASONS

    bad = tmp_path / "bad-000000.tar"
    good = json.dumps({"id": "ok", "texts": {"en": "hello there", "de": "hallo da"}}).encode()
    with wds.TarWriter(str(bad), encoder=False) as sink:
        for i in range(3):
            sink.write({"__key__": f"broken{i}", "json": b"{not json"})
        sink.write({"__key__": "lonely", "json": json.dumps({"id": "lonely", "texts": {"en": "alone"}}).encode()})
        sink.write({"__key__": "ok", "json": good})
    shards = sorted(str(p) for p in (corpus.shards / "train").glob("*.tar")) + [str(bad)]
    loggers = [CSVLogger(str(tmp_path), name="csv")]
    dm = T.datamodule(corpus, train_shards=shards, languages=list(T.LANGUAGES), batch_size=40, shuffle_buffer=0)
    trainer = T.trainer(tmp_path, max_steps=6, logger=loggers, log_every_n_steps=2)
    trainer.fit(T.module(corpus), datamodule=dm)

    rows = T.csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    logged = [r for r in rows if "data/skipped/bad_json" in r]
    assert [int(r["step"]) for r in logged] == [1, 3, 5]
    assert all(f"data/skipped/{reason}" in r for r in logged for reason in SKIP_REASONS)
    # 142 usable rows are 4 batches of 40: steps 0-3 are epoch 0, steps 4-5 re-read the bad shard in epoch 1
    assert dm.skip_counts("train") == {"bad_json": 6, "no_usable_text": 2}
    assert [(r["data/skipped/bad_json"], r["data/skipped/no_usable_text"]) for r in logged] == [
        (3.0, 1.0), (3.0, 1.0), (6.0, 2.0)]
    assert all(r["data/skipped/corrupt_tar"] == 0.0 for r in logged)
