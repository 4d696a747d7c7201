"""Corpus readers, the pivot join, gettext catalogs and cleaning (alignment.data.readers, alignment.data.cleaning)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polib
import pytest

from alignment.data.cleaning import CleaningConfig, CleaningReport, check_rows, clean_rows
from alignment.data.readers import CorpusSource, read_corpus
from alignment.data.readers.aligned import read_aligned
from alignment.data.readers.gettext import read_gettext
from alignment.data.readers.jsonl_tsv import read_jsonl, read_tsv
from alignment.data.readers.pairs import Bitext, parse_bitext, read_pairs
from alignment.data.rows import CorpusError, MultiWayRow
from alignment.languages import LanguageCodeError, normalize_language

SIX = ("en", "de", "fr", "es", "ru", "zh-Hans", "ar")


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def loose() -> CleaningReport:
    """A non-strict report: drops are counted, never raised."""
    return CleaningReport(CleaningConfig())


# --------------------------------------------------------------------------- language codes


def test_normalize_language_canonical_forms():
    assert normalize_language("pt_BR") == "pt-BR"
    assert normalize_language("zh_CN") == normalize_language("zh_Hans") == normalize_language("zh") == "zh-Hans"
    assert normalize_language("zh_TW") == "zh-Hant"
    assert normalize_language("sr_Latn") == normalize_language("sr@latin") == "sr-Latn"
    assert normalize_language("iw") == "he"
    with pytest.raises(LanguageCodeError):
        normalize_language("xx_YY")


# --------------------------------------------------------------------------- JSONL


def test_jsonl_flat_and_texts_forms_with_sources(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        '{"id": "a", "en": "Hello", "de": "Hallo"}\n'
        "\n"
        '{"id": 7, "texts": {"en": "Cat", "zh_CN": "猫", "pt_BR": "Gato"}}\n'
        '{"en": "Dog", "fr": "Chien"}\n',
    )
    rows = list(read_jsonl(path))
    assert [r.id for r in rows] == ["a", "7", "c-4"]
    assert rows[1].texts == {"en": "Cat", "zh-Hans": "猫", "pt-BR": "Gato"}
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert all(r.pivot == "en" for r in rows)


def test_jsonl_bad_lines_are_counted_drops_naming_file_line(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        b'{"id": "ok1", "en": "One", "de": "Eins"}\n'
        b'{"id": "bad", "en": "Two", "de": "Zw\xff\xfei"}\n'
        b"not json\n"
        b"[1, 2]\n"
        b'{"id": "num", "en": "Three", "de": 3, "fr": null}\n'
        b'{"id": "ok2", "en": "Four", "de": "Vier"}\n',
    )
    report = loose()
    rows = list(read_jsonl(path, report=report))
    assert [r.id for r in rows] == ["ok1", "num", "ok2"]
    assert rows[1].texts == {"en": "Three"}
    d = report.to_dict()
    assert d["rows"]["dropped"] == {"invalid_utf8": 1, "malformed": 2}
    assert d["texts"]["dropped"] == {"empty": 1, "malformed": 1}
    assert d["examples"]["invalid_utf8"][0].startswith(f"{path}:2")


def test_jsonl_unknown_language_key_is_dropped_or_strict_error_naming_file_line(tmp_path):
    # issue 13: one such key used to abort the whole build even without --strict
    path = write(tmp_path / "c.jsonl", '{"en": "a", "de": "b"}\n{"en": "c", "fr": "d", "source": "http://x"}\n')
    report = loose()
    rows = list(read_jsonl(path, report=report))
    assert [r.texts for r in rows] == [{"en": "a", "de": "b"}, {"en": "c", "fr": "d"}]
    assert report.dropped["text"]["unknown_language"] == 1
    assert report.examples["unknown_language"][0].startswith(f"{path}:2: key 'source' is not a language code")
    with pytest.raises(CorpusError, match=rf"{path}:2: unknown_language .*key 'source' is not a language code"):
        list(read_jsonl(path))  # strict


def test_jsonl_strict_by_default_and_gzip(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b'{"en": "a", "de": "b"}\n{"en": "c", "de": "\xc3("}\n')
    rows = read_jsonl(path)  # no report: strict
    assert next(rows).texts == {"en": "a", "de": "b"}
    with pytest.raises(CorpusError, match=rf"{path}:2: invalid_utf8"):
        next(rows)


# --------------------------------------------------------------------------- TSV


def test_tsv_header_id_column_bom_and_per_field_utf8(tmp_path):
    path = write(
        tmp_path / "c.tsv",
        b"\xef\xbb\xbfen\tid\tde\tzh_Hans\r\n"
        b"Hello\tr1\tHallo\t\xe4\xbd\xa0\xe5\xa5\xbd\r\n"
        b"Bye\tr2\tTsch\xfcss\t\xe5\x86\x8d\xe8\xa7\x81\n"
        b"only\ttwo\n",
    )
    report = loose()
    rows = list(read_tsv(path, report=report))
    assert [r.id for r in rows] == ["r1", "r2"]
    assert rows[0].texts == {"en": "Hello", "de": "Hallo", "zh-Hans": "你好"}
    assert rows[1].texts == {"en": "Bye", "zh-Hans": "再见"}  # only the bad field is dropped
    d = report.to_dict()
    assert d["texts"]["dropped"] == {"invalid_utf8": 1}
    assert d["languages"]["de"]["dropped"] == {"invalid_utf8": 1}
    assert d["rows"]["dropped"] == {"malformed": 1}
    assert d["examples"]["malformed"][0].startswith(f"{path}:4")


def test_tsv_unknown_header_code_names_the_file(tmp_path):
    path = write(tmp_path / "c.tsv", "en\tgerman\nHello\tHallo\n")
    with pytest.raises(CorpusError, match=rf"{path}:1: header column 'german' is not a language code"):
        list(read_tsv(path))


# --------------------------------------------------------------------------- aligned files


def test_aligned_files_by_suffix_and_explicit_language(tmp_path):
    en = write(tmp_path / "corpus.en", "Hello\nGood night\n")
    de = write(tmp_path / "corpus.de", "Hallo\nGute Nacht\n")
    zh = write(tmp_path / "chinese.txt", "你好\n晚安\n")
    rows = list(read_aligned([str(de), str(en), f"zh_CN={zh}"]))
    assert [r.id for r in rows] == ["corpus-1", "corpus-2"]
    assert rows[1].texts == {"en": "Good night", "de": "Gute Nacht", "zh-Hans": "晚安"}
    assert rows[1].source == f"{en}:2"  # the pivot's file names the row
    assert rows[1].source_of("de") == f"{de}:2"


def test_aligned_invalid_utf8_drops_one_text(tmp_path):
    en = write(tmp_path / "c.en", b"a\nb\n")
    de = write(tmp_path / "c.de", b"x\n\xff\n")
    report = loose()
    rows = list(read_aligned([en, de], report=report))
    assert rows[1].texts == {"en": "b"}
    assert report.examples["invalid_utf8"][0].startswith(f"{de}:2 (de)")


def test_aligned_line_count_mismatch_names_both_files(tmp_path):
    en = write(tmp_path / "c.en", "a\nb\nc\n")
    de = write(tmp_path / "c.de", "x\ny\n")
    with pytest.raises(CorpusError, match=rf"{de} has 2 lines but {en} has more \(line 3\)"):
        list(read_aligned([en, de]))


def test_aligned_unknown_suffix_names_the_file(tmp_path):
    en = write(tmp_path / "c.en", "a\n")
    bad = write(tmp_path / "c.txt2", "x\n")
    with pytest.raises(CorpusError, match=rf"{bad}: file name suffix 'txt2' is not a language code"):
        list(read_aligned([en, bad]))


# --------------------------------------------------------------------------- pairs joined on the pivot


def _bitexts(tmp_path: Path) -> list[str]:
    write(tmp_path / "en-de.tsv", "en\tde\nGood morning.\tGuten Morgen.\nThank you.\tDanke.\nYes.\tJa.\n")
    # no header, explicit languages; pivot in the second column; whitespace differs from en-de
    write(tmp_path / "tatoeba.tsv", "Bonjour.\tGood  morning.\nMerci.\tThank you.\nMerci bien.\tThank you.\n")
    write(tmp_path / "opus.en", "Thank you.\nGoodbye.\n")
    write(tmp_path / "opus.ja", "ありがとう。\nさようなら。\n")
    return [
        str(tmp_path / "en-de.tsv"),
        f"fr,en={tmp_path / 'tatoeba.tsv'}",
        f"{tmp_path / 'opus.en'},{tmp_path / 'opus.ja'}",
    ]


def test_parse_bitext_forms(tmp_path):
    specs = _bitexts(tmp_path)
    assert parse_bitext(specs[0]) == Bitext(("en", "de"), (tmp_path / "en-de.tsv",), header=True)
    assert parse_bitext(specs[1]) == Bitext(("fr", "en"), (tmp_path / "tatoeba.tsv",), header=False)
    assert parse_bitext(specs[2]).languages == ("en", "ja")
    assert parse_bitext("en=a.txt,de=b.txt") == Bitext(("en", "de"), (Path("a.txt"), Path("b.txt")))


def test_pairs_join_on_pivot_text_into_multiway_rows(tmp_path):
    report = loose()
    rows = {r.texts["en"]: r for r in read_pairs(_bitexts(tmp_path), report=report, tmp_dir=tmp_path)}
    assert set(rows) == {"Good morning.", "Thank you.", "Yes.", "Goodbye."}
    assert rows["Good morning."].texts == {"en": "Good morning.", "de": "Guten Morgen.", "fr": "Bonjour."}
    assert rows["Thank you."].texts == {"en": "Thank you.", "de": "Danke.", "fr": "Merci.", "ja": "ありがとう。"}
    assert rows["Goodbye."].texts == {"en": "Goodbye.", "ja": "さようなら。"}
    assert rows["Thank you."].source_of("ja") == f"{tmp_path / 'opus.en'}:1"
    # "Merci bien." is a second French translation of "Thank you.": counted, first kept
    assert report.to_dict()["texts"]["dropped"] == {"alternative_translation": 1}
    # the id depends only on the pivot text: stable across inputs and builds
    only_de = {r.texts["en"]: r.id for r in read_pairs(_bitexts(tmp_path)[:1], tmp_dir=tmp_path)}
    assert rows["Thank you."].id == only_de["Thank you."] and rows["Thank you."].id.startswith("en-")


def test_pairs_join_result_does_not_depend_on_bucket_count_and_cleans_up(tmp_path):
    pairs = [(f"sentence {i}", f"Satz {i}", f"phrase {i}") for i in range(300)]
    write(tmp_path / "de.tsv", "en\tde\n" + "".join(f"{e}\t{d}\n" for e, d, _ in pairs))
    write(tmp_path / "fr.tsv", "fr\ten\n" + "".join(f"{f}\t{e}\n" for e, _, f in reversed(pairs)))
    spill = tmp_path / "spill"
    spill.mkdir()
    one = read_pairs([tmp_path / "de.tsv", tmp_path / "fr.tsv"], buckets=1, tmp_dir=spill)
    many = read_pairs([tmp_path / "de.tsv", tmp_path / "fr.tsv"], buckets=13, tmp_dir=spill)
    by_id = lambda rows: {r.id: r.texts for r in rows}  # noqa: E731
    a, b = by_id(one), by_id(many)
    assert a == b and len(a) == 300
    assert all(len(t) == 3 for t in a.values())
    assert list(spill.iterdir()) == []  # bucket files removed after the join


def test_pairs_without_the_pivot_is_an_error(tmp_path):
    write(tmp_path / "de-fr.tsv", "de\tfr\nHallo\tSalut\n")
    with pytest.raises(CorpusError, match="needs the pivot en"):
        list(read_pairs([tmp_path / "de-fr.tsv"], tmp_dir=tmp_path))


# --------------------------------------------------------------------------- gettext


def _po(entries: list[polib.POEntry]) -> polib.POFile:
    po = polib.POFile()
    po.metadata = {"Content-Type": "text/plain; charset=UTF-8", "Language": "xx"}
    for entry in entries:
        po.append(entry)
    return po


def _catalog_tree(root: Path, *, mo: bool = False) -> Path:
    """A tiny gettext tree: de, fr, zh_CN, pt_BR, an English source catalog and an unparseable locale."""
    catalogs = {
        "de": [
            polib.POEntry(msgid="Save", msgstr="Speichern"),
            polib.POEntry(msgid="May", msgctxt="month name", msgstr="Mai"),
            polib.POEntry(msgid="May", msgstr="Darf"),
            polib.POEntry(msgid="Delete", msgstr="Löschen", flags=["fuzzy"]),
            polib.POEntry(msgid="%d item", msgid_plural="%d items", msgstr_plural={0: "%d Ding", 1: "%d Dinge"}),
            polib.POEntry(msgid="Old", msgstr="Alt", obsolete=True),
            polib.POEntry(msgid="Untranslated", msgstr=""),
        ],
        "fr": [
            polib.POEntry(msgid="Save", msgstr="Enregistrer"),
            polib.POEntry(msgid="May", msgctxt="month name", msgstr="Mai"),
            polib.POEntry(msgid="Delete", msgstr="Supprimer"),
        ],
        "zh_CN": [polib.POEntry(msgid="Save", msgstr="保存")],
        "pt_BR": [polib.POEntry(msgid="Delete", msgstr="Excluir")],
        "en": [polib.POEntry(msgid="Save", msgstr="")],
        "xx_YY": [polib.POEntry(msgid="Save", msgstr="???")],
    }
    for locale, entries in catalogs.items():
        folder = root / "app" / "locale" / locale / "LC_MESSAGES"
        folder.mkdir(parents=True)
        po = _po(entries)
        po.save(str(folder / "django.po"))
        if mo:
            po.save_as_mofile(str(folder / "django.mo"))
    return root


def test_gettext_po_tree_keys_on_msgctxt_and_msgid(tmp_path):
    root = _catalog_tree(tmp_path / "tree")
    report = loose()
    rows = {(r.texts["en"], r.source): r for r in read_gettext([root], report=report)}
    texts = sorted((r.texts for r in rows.values()), key=lambda t: (t["en"], sorted(t)))
    assert texts == [
        {"en": "Delete", "fr": "Supprimer", "pt-BR": "Excluir"},
        {"en": "May", "de": "Darf"},
        {"en": "May", "de": "Mai", "fr": "Mai"},  # msgctxt "month name" keeps it apart
        {"en": "Save", "de": "Speichern", "fr": "Enregistrer", "zh-Hans": "保存"},
    ]
    d = report.to_dict()
    assert d["texts"]["dropped"] == {
        "gettext_fuzzy": 1,
        "gettext_obsolete": 1,
        "gettext_plural": 1,
        "gettext_untranslated": 1,
    }
    assert d["skipped_locales"] == {"xx_YY": 1}
    assert d["counts"]["gettext catalogs skipped: msgid language (source strings)"] == 1
    assert all(":" in r.source and r.source.split(":")[-1].isdigit() for r in rows.values())  # file:line


def test_gettext_with_another_pivot_keeps_the_msgid_as_english(tmp_path):
    root = _catalog_tree(tmp_path / "tree")
    rows = [r for r in read_gettext([root], pivot="de", report=loose()) if r.texts["en"] == "Save"]
    assert rows[0].pivot == "de" and rows[0].pivot_text == "Speichern"


def test_gettext_mo_gives_the_same_rows_and_auto_prefers_po(tmp_path):
    root = _catalog_tree(tmp_path / "tree", mo=True)
    as_set = lambda rows: sorted(json.dumps(r.to_json(), sort_keys=True) for r in rows)  # noqa: E731
    po_rows = as_set(read_gettext([root], kind="po", report=loose()))
    mo_rows = as_set(read_gettext([root], kind="mo", report=loose()))
    report = loose()
    auto_rows = as_set(read_gettext([root], kind="auto", report=report))
    assert po_rows == mo_rows == auto_rows and len(po_rows) == 4
    assert report.counts["gettext catalogs read"] == 4  # de fr zh_CN pt_BR once each, not twice
    assert "alternative_translation" not in report.to_dict()["texts"]["dropped"]


def test_gettext_unreadable_catalog_is_a_counted_file_drop(tmp_path):
    root = _catalog_tree(tmp_path / "tree")
    write(
        root / "app" / "locale" / "es" / "LC_MESSAGES" / "django.po", 'msgid "Save"\nnot po syntax\nmsgstr "Guardar"\n'
    )
    report = loose()
    rows = list(read_gettext([root], report=report))
    assert len(rows) == 4
    assert report.to_dict()["files"]["dropped"] == {"malformed": 1}
    with pytest.raises(CorpusError, match=r"es/LC_MESSAGES/django.po: malformed"):
        list(read_gettext([root]))


def test_gettext_invalid_utf8_entry_is_dropped_at_its_line(tmp_path):
    folder = tmp_path / "locale" / "de" / "LC_MESSAGES"
    write(
        folder / "django.po",
        b'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n\n'
        b'msgid "Save"\nmsgstr "Speichern"\n\nmsgid "Open"\nmsgstr "\xc3\xffffnen"\n',
    )
    report = loose()
    rows = list(clean_rows(read_gettext([tmp_path / "locale"], report=report), report.config, report))
    assert [r.texts for r in rows] == [{"en": "Save", "de": "Speichern"}]
    assert report.examples["invalid_utf8"][0].startswith(f"{folder / 'django.po'}:8 (de)")


def test_gettext_from_installed_django_and_wagtail():
    report = CleaningReport(CleaningConfig(languages=SIX))
    rows = list(
        clean_rows(read_gettext(packages=["django", "wagtail"], languages=SIX, report=report), report.config, report)
    )
    full = [r for r in rows if set(r.texts) == set(SIX)]
    assert len(full) >= 1700, len(full)
    assert len({r.id for r in rows}) == len(rows)
    assert {"django", "wagtail"} <= {part for r in full[:2000] for part in Path(r.source).parts}
    d = report.to_dict()
    assert d["texts"]["dropped"]["gettext_plural"] > 0 and d["texts"]["dropped"]["same_as_pivot"] > 0


def test_gettext_unknown_package_is_a_clear_error():
    with pytest.raises(CorpusError, match="--from_package no_such_pkg_xyz: no installed package"):
        list(read_gettext(packages=["no_such_pkg_xyz"]))


# --------------------------------------------------------------------------- cleaning


def _row(i: int, **texts: str) -> MultiWayRow:
    return MultiWayRow(id=f"r{i}", texts={k.replace("_", "-"): v for k, v in texts.items()}, source=f"mem.jsonl:{i}")


def test_every_cleaning_reason_is_counted():
    rows = [
        _row(1, en="  Hello world ", de=" Hallo Welt ", fr="   "),  # empty fr
        _row(2, en="Tab\tand\nnewline are fine", de="Tab\tund\nZeilenumbruch"),
        _row(3, en="Bell", de="Glo\x07cke", fr="Cloche"),  # control char
        _row(4, en="Long", de="L" * 51, fr="Long!"),  # too long (max 50)
        _row(5, en="OK", de="OK", fr="D'accord"),  # same as pivot
        _row(6, en="Hello  world", de="Hallo Welt!", fr="Bonjour"),  # duplicate pivot (whitespace)
        _row(7, en="Lonely", de=""),  # too few languages
        _row(8, en="Selected", ja="選ばれた"),  # too few only because ja is not selected
        _row(9, en="Broken", de="kaputt\udcff", fr="cassé"),  # lone surrogate = invalid UTF-8
    ]
    config = CleaningConfig(languages=("en", "de", "fr"), max_chars=50)
    report = CleaningReport(config)
    kept = list(clean_rows(rows, config, report))
    assert [r.id for r in kept] == ["r1", "r2", "r3", "r4", "r5", "r9"]
    assert kept[0].texts == {"en": "Hello world", "de": "Hallo Welt"}  # stripped
    assert kept[1].texts["de"] == "Tab\tund\nZeilenumbruch"
    d = report.to_dict()
    assert d["texts"]["dropped"] == {
        "control_chars": 1,
        "empty": 2,
        "invalid_utf8": 1,
        "language_not_selected": 1,
        "same_as_pivot": 1,
        "too_long": 1,
    }
    assert d["rows"]["dropped"] == {"duplicate_pivot": 1, "too_few_languages": 1, "too_few_selected_languages": 1}
    assert d["rows"] == {"in": 9, "kept": 6, "dropped": d["rows"]["dropped"]}
    assert d["languages"]["de"]["dropped"] == {
        "control_chars": 1,
        "empty": 1,
        "invalid_utf8": 1,
        "same_as_pivot": 1,
        "too_long": 1,
    }
    assert d["texts"]["kept"] == sum(len(r.texts) for r in kept)
    assert d["examples"]["control_chars"] == ["mem.jsonl:3 (de): U+0007 at character 3"]


def test_duplicates_kept_when_deduplication_is_off():
    rows = [_row(1, en="Same", de="Gleich"), _row(2, en="Same", de="Dasselbe")]
    config = CleaningConfig(deduplicate=False)
    assert len(list(clean_rows(rows, config))) == 2


def test_strict_stops_at_the_first_bad_item_naming_file_and_line(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        '{"en": "One", "de": "Eins"}\n{"en": "Two", "de": "Zwei"}\n{"en": "Three", "de": "Dr\\u0000ei"}\n',
    )
    config = CleaningConfig(strict=True)
    report = CleaningReport(config)
    with pytest.raises(CorpusError, match=rf"{path}:3 \(de\): control_chars .*U\+0000.*without --strict"):
        list(clean_rows(read_jsonl(path, report=report), config, report))
    # non-fatal reasons never stop a strict build
    kept = list(clean_rows([_row(1, en="a", de="b", ja="c")], CleaningConfig(strict=True, languages="en,de")))
    assert kept[0].texts == {"en": "a", "de": "b"}


def test_report_json_and_table(tmp_path):
    config = CleaningConfig(max_chars=3)
    report = CleaningReport(config)
    list(clean_rows([_row(1, en="abc", de="abcd", fr="xyz"), _row(2, en="x", de="")], config, report))
    report.write(tmp_path / "report.json")
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["rows"] == {"in": 2, "kept": 1, "dropped": {"too_few_languages": 1}}
    assert d["config"]["max_chars"] == 3 and d["reasons"]["too_long"].startswith("more characters")
    table = report.format_table()
    assert "2 rows in, 1 kept, 1 dropped" in table
    assert "too_long" in table and "too_few_languages" in table and "mem.jsonl:1 (de)" in table


def test_check_rows_uses_config_pivot_and_falls_back_to_id_without_pivot():
    rows = list(check_rows([MultiWayRow("a", {"de": "x", "fr": "y"})], CleaningConfig(), loose()))
    assert rows[0].texts == {"de": "x", "fr": "y"} and rows[0].pivot == "en"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_languages": 1}, "--min_languages must be >= 2"),
        ({"max_chars": 0}, "--max_chars must be >= 1, got 0"),
        ({"pivot": "klingon_XX"}, "--pivot: "),
        ({"languages": "de,fr"}, "--languages must include the pivot --pivot en"),
        ({"languages": "en,de", "min_languages": 3}, "fewer than --min_languages 3"),
        ({"languages": "en,elvish"}, "--languages: "),
    ],
)
def test_cleaning_config_errors_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CleaningConfig(**kwargs)


def test_corpus_source_checks_and_dispatch(tmp_path):
    with pytest.raises(ValueError, match="--from_package applies only to --format gettext"):
        CorpusSource("jsonl", ["a.jsonl"], packages=["django"])
    with pytest.raises(ValueError, match="--format tsv needs at least one INPUT"):
        CorpusSource("tsv")
    with pytest.raises(ValueError, match="--format must be one of"):
        CorpusSource("csv", ["a.csv"])
    a = write(tmp_path / "a.jsonl", '{"en": "a", "de": "b"}\n')
    b = write(tmp_path / "b.jsonl", '{"en": "c", "de": "d"}\n')
    source = CorpusSource("jsonl", [str(a), str(b)])
    assert [r.texts["en"] for r in read_corpus(source)] == ["a", "c"]
    assert source.input_bytes() == a.stat().st_size + b.stat().st_size
