"""Language codes: BCP-47 canonicalisation and the one parser of comma-separated language lists.

A leaf module (imports only the standard library and ``langcodes``): every command, the data
pipeline, evaluation and translation canonicalise codes here, so ``pt_BR``, ``pt-BR`` and ``pt_br``
are one language everywhere. Model-family spellings (``deu_Latn``, ``de_DE``) live with the
translation models (``alignment.translate.codes``), which hand their own normaliser to
:func:`parse_languages`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import langcodes

DEFAULT_PIVOT = "en"
"""The pivot language when none is given: joins, splits and En-X baselines are keyed on it."""


class LanguageCodeError(ValueError):
    """A language code that is not a valid BCP-47 tag."""


@lru_cache(maxsize=4096)
def normalize_language(code: str) -> str:
    """Return the canonical BCP-47 form of a language code.

    Uses ``langcodes`` (the CLDR data) rather than a hand table:
    ``pt_BR`` -> ``pt-BR``, ``iw`` -> ``he``, ``sr_Latn`` / ``sr@latin`` -> ``sr-Latn``.
    Chinese is canonicalised by *script*, since that is what an encoder sees:
    ``zh``, ``zh_CN``, ``zh_SG``, ``zh_Hans`` -> ``zh-Hans`` and ``zh_TW``,
    ``zh_HK``, ``zh_Hant`` -> ``zh-Hant``.

    Raises:
        LanguageCodeError: the code is empty or not a valid tag.
    """
    raw = code.strip()
    if not raw:
        raise LanguageCodeError("empty language code")
    # gettext-style modifiers: sr@latin, be@tarask
    tag = raw.replace("@latin", "-Latn").replace("@cyrillic", "-Cyrl").replace("_", "-")
    try:
        std = langcodes.standardize_tag(tag, macro=True)
        lang = langcodes.Language.get(std)
    except (ValueError, langcodes.tag_parser.LanguageTagError) as exc:
        raise LanguageCodeError(f"invalid language code {code!r}: {exc}") from exc
    if not lang.is_valid() or lang.language is None:
        raise LanguageCodeError(f"unknown language code {code!r}")
    if lang.language == "zh":
        script = lang.script or lang.maximize().script
        return f"zh-{script}"
    return std


def parse_languages(value: str | Sequence[str] | None, flag: str,
                     normalize: Callable[[str], str] = normalize_language) -> tuple[str, ...] | None:
    """``"de,fr,zh"`` (or a list) -> canonical codes, in order, without repeats; errors name ``flag``.

    ``normalize`` maps one code (default :func:`normalize_language`; ``align translate`` also
    accepts model-family spellings such as ``deu_Latn``).
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not str(item).strip():
            continue
        try:
            code = normalize(str(item).strip())
        except LanguageCodeError as exc:
            raise ValueError(f"{flag}: {str(item).strip()!r} is not a language code ({exc})") from None
        if code not in out:
            out.append(code)
    if not out:
        raise ValueError(f"{flag} must name at least one language, got {value!r}")
    return tuple(out)
