"""A second held-out set from another domain: gettext catalogs of packages the demo never trains on.

``python -m alignment.demo.ood --shards demo_out/shards --out demo_out/ood.jsonl``

The demo trains on the catalogs of Django and Wagtail (web-admin UI strings).
This set is read at run time from the catalogs of other installed packages
(default: Django REST framework's API error messages, django-taggit,
django-filter and django-treebeard, which ``pip install wagtail`` brings along),
so that no third-party text is committed, and every row whose English string
also occurs in the training corpus is dropped: the English of each row is
compared (:func:`~alignment.data.rows.pivot_key`, case-folded) with every row of
every split of the shard build *and* every msgid of the packages the build was
read from (``source.packages`` of its manifest), a superset of the corpus. Rows
with the same English are merged into the first; rows translated into fewer
than ``min_languages`` of ``languages`` are dropped.

The output is ``align eval --data`` input: one multi-way row per line
(``{"id", "pivot", "texts"}``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from alignment import fsutil
from alignment.data.cleaning import CleaningReport
from alignment.data.manifest import iter_shard_rows, load_manifest, manifest_file, resolve_shards
from alignment.data.readers.gettext import read_gettext
from alignment.data.rows import MultiWayRow, pivot_key

OOD_PACKAGES = ("rest_framework", "taggit", "django_filters", "treebeard")
"""Installed with ``wagtail`` (its dependencies), so present wherever the demo's corpus is."""


def _key(text: str) -> str:
    return pivot_key(text).casefold()


def training_english(shards: str | Path) -> set[str]:
    """Case-folded pivot keys of the English of every row of the shard build and of its source packages' msgids."""
    manifest = load_manifest(manifest_file(shards))
    pivot = manifest["pivot"]
    seen: set[str] = set()
    for split in manifest["splits"]:
        if not manifest["splits"][split]["shards"]:
            continue
        for shard in resolve_shards(str(shards), split):
            for _, row in iter_shard_rows(shard.url):
                if pivot in row.texts:
                    seen.add(_key(row.texts[pivot]))
    packages = (manifest.get("source") or {}).get("packages") or []
    if packages:
        for row in read_gettext(packages=packages, pivot=pivot, report=CleaningReport()):
            if pivot in row.texts:
                seen.add(_key(row.texts[pivot]))
    return seen


def out_of_domain_rows(
    rows: Iterable[MultiWayRow], exclude: set[str], languages: Sequence[str], *, min_languages: int, pivot: str = "en"
) -> tuple[list[MultiWayRow], dict[str, int]]:
    """Rows restricted to ``languages`` whose English is not in ``exclude``; also counts of what was dropped."""
    keep: dict[str, MultiWayRow] = {}
    dropped = {"in_training_corpus": 0, "duplicate_english": 0, "too_few_languages": 0}
    for row in rows:
        texts = {lang: text for lang, text in row.texts.items() if lang in languages and text.strip()}
        if pivot not in texts:
            dropped["too_few_languages"] += 1
            continue
        key = _key(texts[pivot])
        if key in exclude:
            dropped["in_training_corpus"] += 1
        elif key in keep:
            dropped["duplicate_english"] += 1
        elif len(texts) < min_languages:
            dropped["too_few_languages"] += 1
        else:
            keep[key] = MultiWayRow(id=row.id, texts=texts, pivot=pivot, source=row.source)
    return list(keep.values()), dropped


def build_ood_set(
    shards: str | Path,
    out: str | Path,
    *,
    packages: Sequence[str] = OOD_PACKAGES,
    roots: Sequence[str | Path] = (),
    languages: Sequence[str] | None = None,
    min_languages: int = 7,
) -> tuple[int, dict[str, int]]:
    """Write the out-of-domain rows of ``packages`` / ``roots`` to ``out`` (jsonl); returns (rows, dropped)."""
    manifest = load_manifest(manifest_file(shards))
    pivot = manifest["pivot"]
    languages = list(languages or manifest["languages"])
    exclude = training_english(shards)
    rows = read_gettext(roots, packages, pivot=pivot, languages=languages, report=CleaningReport())
    kept, dropped = out_of_domain_rows(rows, exclude, languages, min_languages=min_languages, pivot=pivot)
    if not kept:
        raise ValueError(f"no out-of-domain rows in {', '.join(packages) or roots} for {','.join(languages)}")
    text = "".join(json.dumps(row.to_json(), ensure_ascii=False) + "\n" for row in kept)
    fsutil.publish_file(Path(out), text)
    return len(kept), dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment.demo.ood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="the training shard build (its rows and source packages are excluded)")
    parser.add_argument("--out", required=True, type=Path, help="jsonl file to write")
    parser.add_argument("--packages", default=",".join(OOD_PACKAGES), help="installed packages to read catalogs from")
    parser.add_argument("--languages", default=None, help="comma-separated; default: the shard build's")
    parser.add_argument("--min_languages", type=int, default=7, help="keep rows translated into at least this many")
    args = parser.parse_args(argv)
    packages = [p for p in args.packages.split(",") if p]
    languages = args.languages.split(",") if args.languages else None
    n, dropped = build_ood_set(args.shards, args.out, packages=packages, languages=languages,
                               min_languages=args.min_languages)
    print(f"wrote {args.out}: {n} out-of-domain rows from {', '.join(packages)}; dropped "
          + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
