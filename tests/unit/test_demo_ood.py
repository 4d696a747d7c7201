"""The demo's out-of-domain held-out set: other catalogs, no English string shared with the training corpus."""

from __future__ import annotations

import json
from pathlib import Path

import polib
import pytest

from alignment.cli import main
from alignment.demo.ood import build_ood_set
from alignment.demo.table import main as table_main


def _tree(root: Path, catalogs: dict[str, dict[str, str]]) -> Path:
    for locale, entries in catalogs.items():
        po = polib.POFile()
        po.metadata = {"Content-Type": "text/plain; charset=UTF-8", "Language": locale}
        for msgid, msgstr in entries.items():
            po.append(polib.POEntry(msgid=msgid, msgstr=msgstr))
        folder = root / locale / "LC_MESSAGES"
        folder.mkdir(parents=True)
        po.save(str(folder / "django.po"))
    return root


TRAIN = {
    "de": {"Save": "Speichern", "Delete": "Löschen", "Cancel": "Abbrechen", "Close": "Schließen"},
    "fr": {"Save": "Enregistrer", "Delete": "Supprimer", "Cancel": "Annuler", "Close": "Fermer"},
}
OOD = {
    # "save " and "DELETE" are training strings up to case and whitespace: excluded
    "de": {"save ": "Sichern", "DELETE": "LÖSCHEN", "Tag list": "Schlagwortliste", "Invalid page.": "Ungültige Seite.",
           "Only German": "Nur Deutsch"},
    "fr": {"save ": "Sauver", "DELETE": "SUPPRIMER", "Tag list": "Liste des étiquettes",
           "Invalid page.": "Page invalide."},
}  # fmt: skip


def test_ood_rows_share_no_english_string_with_the_corpus(tmp_path, capsys):
    train_root = _tree(tmp_path / "train", TRAIN)
    ood_root = _tree(tmp_path / "ood", OOD)
    shards = tmp_path / "shards"
    assert main(["shards", "build", "--format", "gettext", str(train_root), "--out", str(shards),
                 "--languages", "en,de,fr", "--min_languages", "2", "--split", "0.5,0,0.5", "--seed", "0"]) == 0
    out = tmp_path / "ood.jsonl"
    n, dropped = build_ood_set(shards, out, packages=(), roots=[ood_root], languages=["en", "de", "fr"],
                               min_languages=3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(rows) == 2
    assert sorted(r["texts"]["en"] for r in rows) == ["Invalid page.", "Tag list"]
    assert rows[0]["texts"].keys() == {"en", "de", "fr"} and {r["pivot"] for r in rows} == {"en"}
    assert dropped == {"in_training_corpus": 2, "duplicate_english": 0, "too_few_languages": 1}
    with pytest.raises(ValueError, match="no out-of-domain rows"):
        build_ood_set(shards, tmp_path / "none.jsonl", packages=(), roots=[train_root], languages=["en", "de", "fr"])


def test_table_adds_the_out_of_domain_section(tmp_path, capsys):
    def metrics(name: str, value: float, rows: int) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({
            "metrics": {"retrieval_acc_by_lang/de": value, "retrieval_acc/mean": value},
            "summary": {"num_rows": rows, "data": f"{name} (jsonl): {rows} rows", "training_languages": ["de"]},
        }))
        return str(path)

    argv = [metrics("before", 0.5, 10), metrics("after", 0.75, 10), "--ood", metrics("ood0", 0.25, 4),
            metrics("ood1", 0.125, 4), "--out", str(tmp_path / "out")]
    assert table_main(argv) == 0
    table = (tmp_path / "out" / "before_after.md").read_text()
    held_out, ood = table.split("## out-of-domain held-out rows: 4 rows (")
    assert held_out.startswith("## held-out test rows: 10 rows (") and "| retrieval_acc de | 0.5000 | 0.7500 | +0.2500 |" in held_out
    assert "| retrieval_acc de | 0.2500 | 0.1250 | -0.1250 |" in ood
    assert (tmp_path / "out" / "before_after.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_seeds_report_gives_mean_sd_of_the_change_per_set():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "demo_seeds.py"
    spec = importlib.util.spec_from_file_location("demo_seeds", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    names = module.METRICS

    def ev(value: float) -> dict:
        return {"metrics": dict.fromkeys(names, value), "rows": 7}

    data = {"command": "python benchmarks/demo_seeds.py", "date": "2026-12-02T00:00:00+00:00", "fit_args": [],
            "machine": {"cpu": "cpu", "cores": 2, "python": "3.11", "torch": "2"}, "seeds": [0, 1],
            "before": {"test": ev(0.5), "ood": ev(0.25)},
            "runs": [{"seed": s, "fit": {"wall_s": 1.0, "cpu_s": 2.0}, "eval": {"test": ev(v), "ood": ev(v / 2)}}
                     for s, v in ((0, 0.6), (1, 0.8))]}
    text = module.report(data)
    test_part, ood_part = text.split("## out-of-domain rows (other packages): 7 rows")
    # test set: after 0.6, 0.8 -> 0.700 ± 0.141; change +0.1, +0.3 -> 0.200 ± 0.141
    assert "| retrieval_acc/seen_mean | 0.500 | 0.700 ± 0.141 | 0.200 ± 0.141 | +0.100 +0.300 |" in test_part
    assert "| retrieval_acc/unseen_mean | 0.250 | 0.350 ± 0.071 | 0.100 ± 0.071 | +0.050 +0.150 |" in ood_part
