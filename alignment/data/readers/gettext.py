"""gettext catalogs (``.po`` / ``.mo``): the English msgid and its translations, from folders or packages."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from alignment.data.cleaning import CleaningReport
from alignment.data.rows import CorpusError, MultiWayRow, short_hash
from alignment.languages import DEFAULT_PIVOT, LanguageCodeError, normalize_language


@dataclass(frozen=True)
class Catalog:
    """One ``<root>/<locale>/LC_MESSAGES/<domain>.po|.mo`` file."""

    path: Path
    locale: str
    language: str


def package_locale_roots(packages: Sequence[str]) -> list[Path]:
    """The installed folders of Python packages, found without importing them."""
    roots = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise CorpusError(f"--from_package {name}: no installed package of that name (pip install {name})")
        roots.extend(Path(p) for p in spec.submodule_search_locations)
    return roots


def _catalog_files(root: Path, kind: str) -> list[Path]:
    """``.po`` / ``.mo`` files under ``LC_MESSAGES`` folders; ``auto`` prefers .po over a .mo beside it."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise CorpusError(f"{root}: no such file or folder (expected a tree with <locale>/LC_MESSAGES/*.po)")
    files = sorted(p for p in root.rglob("*") if p.parent.name == "LC_MESSAGES" and p.suffix in (".po", ".mo"))
    if kind == "po":
        return [p for p in files if p.suffix == ".po"]
    if kind == "mo":
        return [p for p in files if p.suffix == ".mo"]
    po = {p.with_suffix("") for p in files if p.suffix == ".po"}
    return [p for p in files if p.suffix == ".po" or p.with_suffix("") not in po]


def find_catalogs(
    roots: Sequence[str | os.PathLike],
    packages: Sequence[str] = (),
    *,
    kind: str = "auto",
    pivot: str = DEFAULT_PIVOT,
    languages: Collection[str] | None = None,
    report: CleaningReport | None = None,
) -> list[Catalog]:
    """Every translation catalog under ``roots`` and the installed ``packages``.

    The locale folder (``de``, ``zh_Hans``, ``pt_BR``, ``sr_Latn`` ...) gives
    the language, normalised with :func:`normalize_language`. Folders that are
    not a language code are skipped and counted in ``report.skipped_locales``;
    catalogs in ``pivot`` (here: the msgid language, whose catalogs hold the
    source strings with empty msgstr) and languages not in ``languages`` are
    skipped and counted in ``report.counts``.

    Args:
        kind: ``"po"``, ``"mo"`` or ``"auto"`` (.po, or the .mo where no .po is beside it).
    """
    if kind not in ("auto", "po", "mo"):
        raise ValueError(f"--catalogs must be auto, po or mo, got {kind!r}")
    report = report if report is not None else CleaningReport.strict_for(pivot)
    all_roots = [Path(r) for r in roots] + package_locale_roots(packages)
    catalogs = []
    for root in all_roots:
        for path in _catalog_files(root, kind):
            locale = path.parent.parent.name
            try:
                lang = normalize_language(locale)
            except LanguageCodeError:
                report.skip_locale(locale)
                continue
            if lang == pivot:
                report.count("gettext catalogs skipped: msgid language (source strings)")
            elif languages is not None and lang not in languages:
                report.count("gettext catalogs skipped: language not selected")
            else:
                catalogs.append(Catalog(path=path, locale=locale, language=lang))
    report.count("gettext catalogs read", len(catalogs))
    return catalogs


def _load_catalog(catalog: Catalog, report: CleaningReport):
    """Parse one catalog with polib, or count it as dropped (``file`` level) and return None.

    ``.po`` bytes are decoded with ``surrogateescape`` so invalid UTF-8 stays
    inside the affected entry (dropped later as ``invalid_utf8`` at its line)
    instead of failing the whole file.
    """
    import polib

    path = catalog.path
    try:
        if path.suffix == ".mo":
            return polib.mofile(str(path))
        encoding = polib.detect_encoding(str(path))
        text = path.read_bytes().decode(encoding, errors="surrogateescape")
        return polib.pofile(text, encoding=encoding)
    except UnicodeDecodeError as exc:
        report.drop("invalid_utf8", str(path), level="file", detail=f"{exc.reason} at byte {exc.start}")
    except (OSError, ValueError, LookupError) as exc:  # polib raises OSError("Syntax error in po file (line N)")
        report.drop("malformed", str(path), level="file", detail=str(exc))
    return None


def _entry_drop_reason(entry) -> str | None:
    if getattr(entry, "obsolete", False):
        return "gettext_obsolete"
    if entry.msgid_plural:
        return "gettext_plural"
    if "fuzzy" in getattr(entry, "flags", ()):
        return "gettext_fuzzy"
    if not entry.msgstr.strip():
        return "gettext_untranslated"
    return None


def iter_catalog_entries(catalog: Catalog, report: CleaningReport) -> Iterator[tuple[str, str, str, str]]:
    """Yield ``(key, msgid, msgstr, source)`` for usable entries; drops the rest by reason.

    ``key`` is ``msgctxt + "\\x04" + msgid`` (gettext's own convention) when the
    entry has a context, else the msgid. ``source`` is ``file:line`` for .po and
    ``file#entry-index`` for .mo (which has no lines).
    """
    po = _load_catalog(catalog, report)
    if po is None:
        return
    for index, entry in enumerate(po):
        if not entry.msgid:
            continue  # the header entry
        line = getattr(entry, "linenum", None)
        source = f"{catalog.path}:{line}" if line else f"{catalog.path}#{index}"
        reason = _entry_drop_reason(entry)
        if reason:
            report.drop(reason, source, language=catalog.language)
            continue
        key = f"{entry.msgctxt}\x04{entry.msgid}" if entry.msgctxt else entry.msgid
        yield key, entry.msgid, entry.msgstr, source


def read_gettext(
    roots: Sequence[str | os.PathLike] = (),
    packages: Sequence[str] = (),
    *,
    pivot: str = DEFAULT_PIVOT,
    languages: Collection[str] | None = None,
    kind: str = "auto",
    msgid_language: str = "en",
    report: CleaningReport | None = None,
) -> Iterator[MultiWayRow]:
    """Rows from gettext catalogs: the English msgid and its translations.

    Catalogs are found by :func:`find_catalogs` under folder ``roots`` and
    installed ``packages`` (e.g. ``["django", "wagtail"]``: Django's
    ``conf/locale`` and contrib ``locale`` folders, Wagtail's per-app ones).
    Entries are keyed on ``msgctxt + msgid`` across every catalog and domain
    (``django.po`` and ``djangojs.po`` merge); the msgid is the text in
    ``msgid_language`` (English for Django and Wagtail), usually the pivot.
    Fuzzy, plural, obsolete and untranslated entries are dropped and counted.
    A differing second translation of one key into one language (two apps
    translating "Save" differently) is counted as ``alternative_translation``.

    Row ids are ``po-<hash of the key>``; rows come in first-seen order over
    sorted catalog paths, so the output is deterministic. Memory: the whole
    key -> translations table (catalog-sized: a few MB for Django + Wagtail).

    Args:
        languages: skip catalogs of other languages without parsing them.
        kind: ``"po"``, ``"mo"`` or ``"auto"`` (see :func:`find_catalogs`).
        msgid_language: the language of the msgids; its own catalogs (source
            strings with empty msgstr) are skipped.
    """
    if not roots and not packages:
        raise CorpusError("gettext input needs catalog folders or --from_package names")
    report = report if report is not None else CleaningReport.strict_for(pivot)
    source_lang = normalize_language(msgid_language)
    catalogs = find_catalogs(roots, packages, kind=kind, pivot=source_lang, languages=languages, report=report)
    table: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    for catalog in catalogs:
        for key, msgid, msgstr, source in iter_catalog_entries(catalog, report):
            if key not in table:
                table[key] = ({source_lang: msgid}, {source_lang: source})
            texts, sources = table[key]
            existing = texts.get(catalog.language)
            if existing is None:
                texts[catalog.language], sources[catalog.language] = msgstr, source
            elif existing != msgstr:
                report.drop(
                    "alternative_translation", source, language=catalog.language, detail=f"msgid {msgid[:60]!r}"
                )
    for key, (texts, sources) in table.items():
        yield MultiWayRow(
            id=f"po-{short_hash('gettext', key)}",
            texts=texts,
            pivot=pivot,
            source=sources[source_lang],
            text_sources=sources,
        )
