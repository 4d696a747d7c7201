"""False-negative control: text identities (``alignment.data.identity``) and the duplicate mask of the loss
(``alignment.negatives``), against a loop reference, and through the module's step with and without GradCache."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from alignment.data.collate import SelectedRow, collate
from alignment.data.identity import normalise, text_id, text_ids
from alignment.gradcache import GradCache
from alignment.losses import GlobalCandidates, LossConfig, multiway_infonce, total_loss

# (row, language, text): duplicates across rows ("Save"/"save!", "Annuler", "OK"/"ok"), duplicates inside a row
# (untranslated "OK"), a row reduced to one sentence that duplicates another row ("SAVE").
SENTENCES = [
    (0, 0, "Save"), (0, 1, "Speichern"), (0, 2, "Enregistrer"),
    (1, 0, "save!"), (1, 1, "Sichern"),
    (2, 0, "Cancel"), (2, 1, "Abbrechen"), (2, 2, "Annuler"),
    (3, 0, "Undo"), (3, 2, "Annuler"),
    (4, 0, "OK"), (4, 1, "OK"), (4, 2, "D'accord"),
    (5, 0, "ok"), (5, 2, "Très bien"),
    (6, 0, "SAVE"),
    (7, 0, "Delete"), (7, 1, "Löschen"), (7, 2, "Supprimer"),
]
MODES = ("rows", "texts", "off")


def sentences(dtype=torch.float64, seed=0):
    rows = torch.tensor([s[0] for s in SENTENCES])
    langs = torch.tensor([s[1] for s in SENTENCES])
    texts = torch.tensor(text_ids(s[2] for s in SENTENCES))
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(len(SENTENCES), 8, generator=g, dtype=dtype), dim=-1)
    return emb, rows, langs, texts


def candidates(emb, rows, langs, texts):
    return replace(GlobalCandidates.single(emb, rows, langs), text_ids=texts)


def masked_pair(i, j, mode) -> bool:
    """Is candidate ``j`` kept out of anchor ``i``'s softmax? Spelled out with Python sets."""
    (ri, _, ti), (rj, _, tj) = SENTENCES[i], SENTENCES[j]
    if ri == rj or mode == "off":
        return False
    if mode == "texts":
        return normalise(ti) == normalise(tj)
    row_texts = lambda r: {normalise(t) for row, _, t in SENTENCES if row == r}  # noqa: E731
    return bool(row_texts(ri) & row_texts(rj))


def reference_loss(emb, objective, mode, temperature=0.1, margin=0.0, pivot=0):
    """The masked global loss with loops: candidates lose their masked pairs, positives are the own row's."""
    rows, langs = [s[0] for s in SENTENCES], [s[1] for s in SENTENCES]
    n = len(rows)

    def logit(i, j):
        return (emb[i] @ emb[j] - (margin if rows[i] == rows[j] else 0.0)) / temperature

    def term(i, cands):
        positives = [j for j in cands if rows[j] == rows[i]]
        if not positives:
            return None
        den = torch.logsumexp(torch.stack([logit(i, j) for j in cands]), 0)
        return den - torch.logsumexp(torch.stack([logit(i, j) for j in positives]), 0)

    def kept(i, pool):
        return [j for j in pool if j != i and not masked_pair(i, j, mode)]

    if objective == "multi_positive":
        terms = [t for i in range(n) if (t := term(i, kept(i, range(n)))) is not None]
        return torch.stack(terms).mean()
    means = []
    for a in sorted(set(langs)):
        for b in sorted(set(langs)):
            if a == b or (objective == "en_x" and pivot not in (a, b)):
                continue
            pool = [j for j in range(n) if langs[j] == b]
            terms = [t for i in range(n) if langs[i] == a and (t := term(i, kept(i, pool))) is not None]
            if terms:
                means.append(torch.stack(terms).mean())
    return torch.stack(means).mean()


def test_near_identical_means_nfkc_casefold_no_punctuation_one_space():
    same = ["Save", "save", "SAVE...", "_Save", "  Save\t", "Ｓａｖｅ", "Save!"]
    assert len({text_id(t) for t in same}) == 1
    assert text_id("Straße") == text_id("STRASSE") and text_id("Don't") == text_id("dont")
    assert text_id("100%") == text_id("100") and text_id("$5") != text_id("5")
    assert len({text_id(t) for t in ["Save", "Save as", "Speichern", "...", "!", "saves"]}) == 6
    assert text_id("Save") == 922770489735392205  # stable across processes and machines (BLAKE2b, not hash())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("objective,margin", [("multi_positive", 0.0), ("multi_positive", 0.3), ("pairwise", 0.0),
                                              ("en_x", 0.2)])
def test_masked_loss_matches_loop_reference(objective, margin, mode):
    emb, rows, langs, texts = sentences()
    ours_in, ref_in = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    out = multiway_infonce(ours_in, candidates(ours_in, rows, langs, texts), objective=objective, temperature=0.1,
                           margin=margin, pivot_lang_id=0, mask_duplicates=mode)
    ref = reference_loss(ref_in, objective, mode, margin=margin)
    out["contrastive_loss"].backward()
    ref.backward()
    torch.testing.assert_close(out["contrastive_loss"], ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-10, rtol=1e-10)
    n = len(SENTENCES)
    expected = sum(masked_pair(i, j, mode) for i in range(n) for j in range(n))
    assert out["masked_negatives"].item() == expected


def test_modes_nest_and_off_equals_no_text_ids():
    emb, rows, langs, texts = sentences()
    counts = {m: multiway_infonce(emb, candidates(emb, rows, langs, texts), mask_duplicates=m)["masked_negatives"]
              for m in MODES}
    # texts: Save/save!/SAVE (3 rows: 6 ordered pairs), Annuler x2 (2), OK x2 vs ok (4); rows adds their rows' others
    assert counts["off"] == 0 and counts["texts"] == 12 and counts["rows"] > counts["texts"]
    plain = multiway_infonce(emb, GlobalCandidates.single(emb, rows, langs))
    off = multiway_infonce(emb, candidates(emb, rows, langs, texts), mask_duplicates="off")
    assert plain["contrastive_loss"] == off["contrastive_loss"] and plain["masked_negatives"] == 0


def test_a_masked_duplicate_gets_no_push():
    """Rows 0 (Save), 1 (save!) and 6 (SAVE, alone): every cross-row pair is a duplicate pair, so the masked loss
    leaves the lone 'SAVE' untouched, while the unmasked loss pushes it away from the others."""
    emb, rows, langs, texts = sentences()
    keep = torch.tensor([0, 1, 2, 3, 4, 15])
    grads = {}
    for mode in ("rows", "off"):
        leaf = emb[keep].clone().requires_grad_(True)
        cands = candidates(leaf, rows[keep], langs[keep], texts[keep])
        multiway_infonce(leaf, cands, mask_duplicates=mode)["contrastive_loss"].backward()
        grads[mode] = leaf.grad[-1]
    assert grads["rows"].abs().max() == 0.0 and grads["off"].abs().max() > 1e-3


def test_collate_gives_text_ids_and_they_travel_with_the_batch():
    rows = [SelectedRow("a", [0, 1], ["Save", "Speichern"]), SelectedRow("b", [0, 1], ["save.", "Sichern"])]
    batch = collate(rows, [[1, 5, 2], [1, 6, 2], [1, 5, 2], [1, 7, 2]], languages=("en", "de"), pivot_lang_id=0,
                    pad_id=0)
    assert batch.text_ids.tolist() == text_ids(["Save", "Speichern", "Save", "Sichern"])
    assert batch.text_ids[0] == batch.text_ids[2] and batch.to("cpu").text_ids is not None


def test_config_names_the_flag():
    with pytest.raises(ValueError, match="--model.loss.mask_duplicates must be one of rows, texts, off"):
        LossConfig(mask_duplicates="all")


# ---------------------------------------------------------------------------- the module's step, with GradCache


def make_module(mode: str, token_budget: int | None = None):
    """A tiny float64 ``AlignmentModule`` without dropout (the passes compare gradients, not dropout masks)."""
    from alignment.gradcache import GradCacheConfig
    from alignment.model import ModelConfig
    from alignment.module import AlignmentModule, StepConfig

    torch.manual_seed(0)
    module = AlignmentModule(ModelConfig(name_or_path="tiny", vocab_size=100),
                             LossConfig(mask_duplicates=mode, learn_temperature=True), gradcache=GradCacheConfig(),
                             step=StepConfig(token_budget=token_budget)).double()
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module


def make_batch(row_numbers=range(8)):
    """The :data:`SENTENCES` of ``row_numbers`` collated in that order (duplicates get the same token ids)."""
    rows = {r: SelectedRow(str(r), [], []) for r in row_numbers}
    for r, lang, text in SENTENCES:
        if r in rows:
            rows[r].lang_ids.append(lang)
            rows[r].texts.append(text)
    chosen = [rows[r] for r in row_numbers]
    vocab = lambda t: 5 + text_id(t) % 90  # noqa: E731  token ids in [5, 95)
    sequences = [[2] + [vocab(t)] * (1 + len(t) % 3) + [3] for row in chosen for t in row.texts]
    return collate(chosen, sequences, languages=("en", "de", "fr"), pivot_lang_id=0, pad_id=0)


def _module_and_batch(mode: str, token_budget: int | None = None):
    return make_module(mode, token_budget), make_batch()


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("token_budget", [None, 24])
def test_gradcache_gives_the_plain_steps_gradients_with_duplicates_masked(token_budget):
    module, batch = _module_and_batch("rows", token_budget)
    out = module._loss_terms(module._encode(batch), batch)
    total_loss(out).backward()
    plain = _grads(module)
    module.zero_grad(set_to_none=True)
    cached = GradCache(module._encode, module._loss_terms, 5, token_budget=token_budget).step(batch)
    assert cached["masked_negatives"] == out["masked_negatives"] > 0
    assert cached["contrastive_loss"].item() == pytest.approx(out["contrastive_loss"].item(), rel=1e-12)
    got = _grads(module)
    assert got.keys() == plain.keys() and "loss_fn.log_temperature" in got
    for name, grad in plain.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    off, _ = _module_and_batch("off", token_budget)
    total_loss(off._loss_terms(off._encode(batch), batch)).backward()
    assert not torch.allclose(_grads(off)["loss_fn.log_temperature"], plain["loss_fn.log_temperature"])


def test_normalise_equals_its_per_character_definition():
    """The table-driven normalise (translate, str.split) equals the definition it replaced: NFKC + casefold,
    drop every character of Unicode category P*, collapse whitespace (regex \\s), strip; the folded text when
    nothing is left. Random strings over ASCII, Latin, general punctuation, CJK symbols, supplementary
    planes and every kind of whitespace."""
    import random
    import re
    import unicodedata

    space = re.compile(r"\s+")

    def reference(text: str) -> str:
        folded = unicodedata.normalize("NFKC", text).casefold()
        stripped = "".join(ch for ch in folded if not unicodedata.category(ch).startswith("P"))
        out = space.sub(" ", stripped).strip()
        return out if out else space.sub(" ", folded).strip()

    rng = random.Random(0)
    blanks = [" ", "\t", "\n", "\x0b", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u2028", "\u3000", "\u200b"]
    planes = [(0x20, 0x250), (0x2000, 0x3100), (0xFE10, 0xFF70), (0x10000, 0x1F000)]
    for _ in range(5000):
        text = "".join(rng.choice(blanks) if rng.random() < 0.25 else chr(rng.randrange(*rng.choice(planes)))
                       for _ in range(rng.randrange(0, 16)))
        assert normalise(text) == reference(text), repr(text)
