"""The extra objectives (``alignment/objectives/``) against loop references on small tensors.

Each term is written out sentence by sentence with Python loops and no masks; the vectorised term must
match it in value and in gradient. Config errors name the flag. The distributed equivalence of each term is
``tests/distributed/test_objectives_ddp.py``; the ``align fit`` path is ``test_objectives_fit.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignment.losses import GlobalCandidates, LossConfig, MultiWayContrastiveLoss
from alignment.objectives import AdversarialConfig, DistillConfig, MatryoshkaConfig, NeighbourhoodConfig
from alignment.objectives.adversarial import LanguageDiscriminator, adversarial_loss, reversal_lambda
from alignment.objectives.distill import distill_loss
from alignment.objectives.matryoshka import matryoshka_loss
from alignment.objectives.neighbourhood import neighbourhood_loss
from tests.unit.test_losses import ROWS, flat_batch, reference_loss


def _leaf(emb):
    return emb.clone().requires_grad_(True)


# ---------------------------------------------------------------------------- adversarial


@pytest.mark.parametrize(("ramp", "step", "expected"), [
    ("constant", 0, 1.0), ("linear", 50, 0.5), ("dann", 0, 0.0), ("dann", 100, 2 / (1 + math.exp(-10)) - 1),
    ("dann", 50, 2 / (1 + math.exp(-5)) - 1), ("linear", 10, 0.0),
])
def test_reversal_lambda_schedule(ramp, step, expected):
    warmup = 10 if step == 10 else 0
    cfg = AdversarialConfig(weight=1.0, ramp=ramp, ramp_steps=100, warmup_steps=warmup)
    assert reversal_lambda(cfg, step) == pytest.approx(expected)


def test_adversarial_matches_loop_and_reverses_the_encoder_gradient():
    emb, _, langs = flat_batch()
    torch.manual_seed(0)
    disc = LanguageDiscriminator(emb.shape[1], 4, hidden_dim=16, dropout=0.0).double()
    weight, lam = 0.7, 0.3

    x = _leaf(emb)
    out = adversarial_loss(x, langs, disc, weight=weight, coefficient=lam, num_sentences=len(langs))
    out["adversarial_loss"].backward()
    got_x, got_d = x.grad.clone(), [p.grad.clone() for p in disc.parameters()]

    disc.zero_grad()
    y = _leaf(emb)
    terms = [-F.log_softmax(disc(y[i]), dim=0)[langs[i]] for i in range(len(langs))]  # one sentence at a time
    ref = weight * torch.stack(terms).sum() / len(langs)
    ref.backward()
    assert float(out["adversarial_loss"].detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(got_x, -lam * y.grad)  # the encoder receives the reversed, scaled gradient
    for got, p in zip(got_d, disc.parameters()):
        torch.testing.assert_close(got, p.grad)  # the discriminator descends its own cross-entropy
    hits = sum(int(disc(emb[i]).argmax()) == int(langs[i]) for i in range(len(langs)))
    assert float(out["adv_accuracy"]) == pytest.approx(hits / len(langs))


# ---------------------------------------------------------------------------- neighbourhood


def neighbourhood_reference(emb, ref, langs, t):
    """Mean over anchors with a same-language neighbour of KL(p_ref || q), spelled out."""
    kls = []
    for i in range(len(langs)):
        nbrs = [j for j in range(len(langs)) if j != i and langs[j] == langs[i]]
        if not nbrs:
            continue
        p = torch.softmax(torch.stack([ref[i] @ ref[j] for j in nbrs]) / t, 0)
        log_q = torch.log_softmax(torch.stack([emb[i] @ emb[j] for j in nbrs]) / t, 0)
        kls.append((p * (p.log() - log_q)).sum())
    return torch.stack(kls).mean()


def test_neighbourhood_matches_loop_value_and_gradient():
    # the second batch adds language 4 with a single sentence: it has no neighbour and is no anchor
    for rows_list in (ROWS, ROWS + [[0, 4]]):
        emb, rows, langs = flat_batch(rows_list)
        refs = flat_batch(rows_list, seed=1)[0]  # the frozen model's embeddings of the same sentences
        x = _leaf(emb)
        out = neighbourhood_loss(x, refs, GlobalCandidates.single(x, rows, langs), refs, weight=2.0, temperature=0.1)
        out["neighbourhood_loss"].backward()
        y = _leaf(emb)
        expected = 2.0 * neighbourhood_reference(y, refs, langs.tolist(), 0.1)
        expected.backward()
        assert float(out["neighbourhood_loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
        torch.testing.assert_close(x.grad, y.grad)
    emb, rows, langs = flat_batch()
    # the same embeddings as the reference: nothing to preserve
    cands = GlobalCandidates.single(emb, rows, langs)
    zero = neighbourhood_loss(emb, emb, cands, emb, weight=1.0, temperature=0.1)["neighbourhood_loss"]
    assert abs(float(zero)) < 1e-12


# ---------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_distill_matches_loop(kind):
    emb, rows, langs = flat_batch()
    num_rows = int(rows.max()) + 1
    targets = F.normalize(torch.randn(num_rows, emb.shape[1], dtype=emb.dtype, generator=torch.Generator().manual_seed(3)), dim=-1)
    has = torch.tensor([0 in langs_of for langs_of in ROWS])  # rows with a pivot (language 0) sentence
    x = _leaf(emb)
    out = distill_loss(x, rows, targets, has, GlobalCandidates.single(x, rows, langs), 0, weight=0.5, kind=kind)
    out["distill_loss"].backward()
    y = _leaf(emb)
    terms = []
    for i in range(len(rows)):
        if not has[rows[i]]:
            continue  # a row without its pivot has no target
        t = targets[rows[i]]
        terms.append(1 - F.cosine_similarity(y[i], t, dim=0) if kind == "cosine" else ((y[i] - t) ** 2).sum())
    expected = 0.5 * torch.stack(terms).mean()
    expected.backward()
    assert float(out["distill_loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    torch.testing.assert_close(x.grad, y.grad)


# ---------------------------------------------------------------------------- matryoshka


@pytest.mark.parametrize("objective", ["multi_positive", "pairwise"])
def test_matryoshka_matches_loop_over_truncated_renormalised_embeddings(objective):
    emb, rows, langs = flat_batch(dim=12)
    loss_fn = MultiWayContrastiveLoss(LossConfig(objective=objective, temperature=0.1)).double()
    cfg = MatryoshkaConfig(dims=[4, 8], weights=[0.25, 1.0])
    x = _leaf(emb)
    out = matryoshka_loss(loss_fn, x, GlobalCandidates.single(x, rows, langs), cfg, pivot_lang_id=0)
    out["matryoshka_loss"].backward()
    y = _leaf(emb)
    t = float(loss_fn.temperature())  # 0.1 as stored (a float32 log-temperature)
    expected = sum(w * reference_loss(F.normalize(y[:, :d], dim=-1), rows, langs, objective, t)
                   for d, w in zip(cfg.dims, cfg.weights))
    expected.backward()
    assert float(out["matryoshka_loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    torch.testing.assert_close(x.grad, y.grad)
    assert set(out) >= {"matryoshka_4", "matryoshka_8", "matryoshka_4_acc", "matryoshka_8_acc"}


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize(("build", "flag"), [
    (lambda: AdversarialConfig(weight=-1), "--model.adversarial.weight"),
    (lambda: AdversarialConfig(ramp="cosine"), "--model.adversarial.ramp"),
    (lambda: AdversarialConfig(num_languages=1), "--model.adversarial.num_languages"),
    (lambda: NeighbourhoodConfig(temperature=0), "--model.neighbourhood.temperature"),
    (lambda: DistillConfig(kind="l1"), "--model.distill.kind"),
    (lambda: DistillConfig(contrastive_weight=-1), "--model.distill.contrastive_weight"),
    (lambda: MatryoshkaConfig(dims=[128, 64]), "--model.matryoshka.dims"),
    (lambda: MatryoshkaConfig(dims=[64], weights=[1.0, 2.0]), "--model.matryoshka.weights"),
    (lambda: MatryoshkaConfig(dims=[64]).check_width(64), "--model.matryoshka.dims"),
])
def test_config_errors_name_the_flag(build, flag):
    with pytest.raises(ValueError, match=flag.replace(".", r"\.")):
        build()


def _objectives(**configs):
    from alignment.objectives import Objectives

    args = {"adversarial": AdversarialConfig(), "neighbourhood": NeighbourhoodConfig(), "distill": DistillConfig(),
            "matryoshka": MatryoshkaConfig(), **configs}
    return Objectives(**args, embedding_dim=32)


def test_teacher_of_another_width_is_refused_naming_both_flags(tmp_path):
    from alignment.model import DualEncoder
    from alignment.synthetic import tiny_tokenizer

    tok = tiny_tokenizer(save_dir=tmp_path / "teacher")
    DualEncoder.from_config(DualEncoder.tiny_config(len(tok)), projection_dim=16).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"--model\.distill\.teacher .* 16 dimensions .* student in 32.*"
                                         r"--model\.encoder\.projection_dim 16"):
        _objectives(distill=DistillConfig(teacher=str(tmp_path / "teacher")))
    with pytest.raises(ValueError, match=r"--model\.distill\.teacher .* does not load"):
        _objectives(distill=DistillConfig(teacher=str(tmp_path / "missing")))


def test_objectives_refuse_what_cannot_train():
    with pytest.raises(ValueError, match=r"--model\.distill\.contrastive_weight 0 leaves no alignment objective"):
        _objectives(distill=DistillConfig(contrastive_weight=0.0))
    adversarial = _objectives(adversarial=AdversarialConfig(weight=1.0))
    with pytest.raises(ValueError, match=r"--model\.adversarial\.num_languages is needed"):
        adversarial.setup_languages(None)
    adversarial.setup_languages(5)  # sized by the data's vocabulary
    assert adversarial.discriminator.net[-1].out_features == 5
    fixed = _objectives(adversarial=AdversarialConfig(weight=1.0, num_languages=3))
    with pytest.raises(ValueError, match=r"--model\.adversarial\.num_languages 3 is below the data's 4 languages"):
        fixed.setup_languages(4)
    card = {"matryoshka_dims": [1]}  # a stale note from the starting folder
    _objectives().record_in(card)
    assert card == {}
    _objectives(matryoshka=MatryoshkaConfig(dims=[8, 16])).record_in(card)
    assert card == {"matryoshka_dims": [8, 16]}
