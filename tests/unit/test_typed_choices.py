"""Every closed choice of the training config is a ``Literal``: a typo is refused by the parser, naming the
flag as typed and the allowed values, by ``align fit --print_config`` and by ``align submit --dry_run``
(before anything reaches the queue)."""

from __future__ import annotations

import sys

import pytest

from alignment.cli import main

CHOICES = [
    ("--model.loss.objective", "multi_postive", "multi_positive, pairwise, en_x"),
    ("--model.loss.drift_kind", "cosin", "cosine, mse"),
    ("--model.encoder.pooling", "clss", "mean, cls, last"),
    ("--model.optim.schedule", "cosinus", "cosine, linear, constant"),
    ("--data.language_policy", "pivot-pair", "all, k, pivot_pair"),
    ("--data.val_language_policy", "al", "all, k, pivot_pair"),
    ("--data.multiprocessing_context", "forkserver", "fork, spawn"),
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["align"])


@pytest.mark.parametrize(("flag", "typo", "allowed"), CHOICES, ids=[c[0] for c in CHOICES])
def test_print_config_refuses_a_typo(capsys, flag, typo, allowed):
    rc = main(["fit", "--config", "recipe:xlm-roberta-base-multiway", flag, typo, "--print_config"])
    out, err = capsys.readouterr()
    assert rc == 2 and not out
    assert f"align fit: error: {flag}: must be one of {allowed}, got '{typo}'" in err.splitlines()


@pytest.mark.parametrize(("flag", "typo", "allowed"), CHOICES[:3], ids=[c[0] for c in CHOICES[:3]])
def test_submit_dry_run_refuses_a_typo(capsys, tmp_path, monkeypatch, flag, typo, allowed):
    monkeypatch.chdir(tmp_path)
    rc = main(["submit", "--fit_config", "recipe:xlm-roberta-base-multiway", "--gpus_per_node", "1", "--dry_run",
               "--", flag, typo])
    out, err = capsys.readouterr()
    assert rc == 2 and "#SBATCH" not in out
    assert f"align fit: error: {flag}: must be one of {allowed}, got '{typo}'" in err.splitlines()
