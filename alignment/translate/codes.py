"""Language codes of NMT model families, mapped to and from the project's canonical BCP-47 codes.

Every family names languages its own way:

============  ======================  =============================================
family        code of German          where the model's codes come from
============  ======================  =============================================
``nllb``      ``deu_Latn`` (FLORES)   the tokenizer's ``xxx_Xxxx`` special tokens
``m2m100``    ``de``                  ``tokenizer.lang_code_to_id`` (``__de__``)
``mbart50``   ``de_DE``               ``tokenizer.lang_code_to_id`` (``en_XX`` ...)
``marian``    (one model per pair)    the name ``opus-mt-en-de`` or the tokenizer's
                                      ``>>de<<`` target tokens
============  ======================  =============================================

A user's code (``de``, ``pt_BR``, ``zh``, ``deu_Latn``) is canonicalised with
:func:`~alignment.languages.normalize_language`; so is each of the model's own
codes (``arb_Arab`` -> ``ar``, ``zho_Hans`` -> ``zh-Hans``, ``pt_XX`` -> ``pt``).
The two meet on *(language, script)*, the script filled in from CLDR when a
code leaves it implicit (``sr`` is Cyrillic, ``sr-Latn`` is not), the region
ignored (``pt-BR`` takes mBART's ``pt_XX``): no hand table to go stale, and
the model's own list is the only authority on what it knows. A code the model
lacks is a :class:`LanguageNotSupported` naming it, the model and what the
model does know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

import langcodes

from alignment.languages import LanguageCodeError, normalize_language, parse_languages

Family = Literal["nllb", "m2m100", "mbart50", "marian"]
FAMILIES: tuple[str, ...] = get_args(Family)
EXAMPLE = {"nllb": "deu_Latn", "m2m100": "de", "mbart50": "de_DE", "marian": ">>de<<"}
_NLLB_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
_MBART_CODE = re.compile(r"^[a-z]{2,3}_[A-Z]{2}$")
_MARIAN_NAME = re.compile(r"opus-mt-(?:tc-[a-z]+-)?([A-Za-z_]+)-([A-Za-z_]+)$")
_MARIAN_TARGET = re.compile(r"^>>([^<>]+)<<$")


class LanguageNotSupported(ValueError):
    """The model has no code for a language (the message names both and lists what it knows)."""


def detect_family(model_type: str, tokenizer) -> str:
    """The family of a loaded model, from its config's ``model_type`` and its tokenizer class.

    Raises:
        ValueError: a model of no supported family (pass ``--family`` for a compatible one).
    """
    name = type(tokenizer).__name__.lower()
    if model_type == "marian" or "marian" in name:
        return "marian"
    if "nllb" in name:
        return "nllb"
    if "m2m100" in name or model_type == "m2m_100":
        return "m2m100"
    if "mbart50" in name or model_type == "mbart":
        return "mbart50"
    raise ValueError(
        f"cannot tell the language-code family of a {model_type!r} model with a {type(tokenizer).__name__}; "
        f"supported: {', '.join(FAMILIES)} (pass --family to name one)"
    )


def canonical_of(model_code: str, family: str) -> str | None:
    """The canonical BCP-47 code of one of a model's own codes, or None when it does not parse."""
    if family == "nllb":
        text = model_code.replace("_", "-")
    elif family == "mbart50":
        lang, _, region = model_code.partition("_")
        text = "zh-Hans" if model_code == "zh_CN" else lang
    else:
        text = model_code
    try:
        return normalize_language(text)
    except LanguageCodeError:
        return None


def match_key(code: str) -> tuple[str, str]:
    """``(language, script)`` of a canonical code, the script from CLDR when implicit; the region dropped."""
    lang = langcodes.Language.get(code)
    script = lang.script or lang.maximize().script or ""
    return lang.language or code, script


def known_codes(family: str, tokenizer) -> list[str]:
    """The language codes a tokenizer knows, in the family's own spelling."""
    if family == "marian":
        return [m.group(1) for t in getattr(tokenizer, "supported_language_codes", []) or []
                if (m := _MARIAN_TARGET.match(t))]
    if family in ("m2m100", "mbart50") and getattr(tokenizer, "lang_code_to_id", None):
        unk = tokenizer.unk_token_id
        return [c for c, i in tokenizer.lang_code_to_id.items() if i is not None and i != unk]
    pattern = _NLLB_CODE if family == "nllb" else _MBART_CODE
    tokens = set(tokenizer.get_vocab()) | {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    return sorted(t for t in tokens if pattern.match(t))


def marian_pair(name_or_path: str, tokenizer) -> tuple[str | None, str | None]:
    """A Marian model's (source, target) from the tokenizer's ``source_lang``/``target_lang`` or its name."""
    src, tgt = getattr(tokenizer, "source_lang", None), getattr(tokenizer, "target_lang", None)
    if src and tgt:
        return src, tgt
    match = _MARIAN_NAME.search(str(name_or_path).rstrip("/"))
    return (match.group(1), match.group(2)) if match else (None, None)


@dataclass
class LanguageMap:
    """Canonical BCP-47 code <-> the model's own code, for one loaded model.

    Build it with :meth:`for_model`; :meth:`code` resolves a user's code.
    """

    family: str
    model: str
    codes: list[str]
    """The model's own codes (for Marian: its target codes, or the one pair)."""
    pair: tuple[str | None, str | None] = (None, None)
    """Marian only: the model's (source, target) language, canonical."""
    _by_key: dict[tuple[str, str], list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for code in self.codes:
            canonical = canonical_of(code, self.family)
            if canonical is not None:
                self._by_key.setdefault(match_key(canonical), []).append(code)

    @classmethod
    def for_model(cls, family: str, model: str, tokenizer) -> "LanguageMap":
        codes = known_codes(family, tokenizer)
        pair: tuple[str | None, str | None] = (None, None)
        if family == "marian":
            src, tgt = marian_pair(model, tokenizer)
            pair = (_canonical_or_none(src), _canonical_or_none(tgt))
        return cls(family, model, codes, pair)

    def _describe(self) -> str:
        if self.family == "marian" and not self.codes:
            src, tgt = self.pair
            return f"it translates {src or '?'} -> {tgt or '?'} only (one Marian model per language pair)"
        shown = ", ".join(self.codes[:12]) + (" ..." if len(self.codes) > 12 else "")
        return f"it knows {len(self.codes)} {self.family} code(s): {shown}"

    def code(self, language: str, *, flag: str, role: str = "target") -> str | None:
        """The model's code for ``language`` (a canonical code), or None for a Marian pair model.

        Raises:
            LanguageNotSupported: the model has no code for it (names the flag, the language and the model).
        """
        if self.family == "marian":
            return self._marian_code(language, flag=flag, role=role)
        if language in self.codes:  # the model's own spelling, given as is
            return language
        found = self._by_key.get(match_key(language), [])
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise LanguageNotSupported(
                f"{flag} {language}: {self.model} has several codes for it ({', '.join(found)}); "
                f"pass the one you mean, e.g. {flag} {found[0]}"
            )
        raise LanguageNotSupported(
            f"{flag} {language}: {self.model} has no {self.family} language code for {language} "
            f"(the form is like {EXAMPLE[self.family]}); {self._describe()}"
        )

    def _marian_code(self, language: str, *, flag: str, role: str) -> str | None:
        src, tgt = self.pair
        if role == "source":
            if src is not None and match_key(src)[0] != match_key(language)[0]:
                raise LanguageNotSupported(f"{flag} {language}: {self.model} translates from {src}, not {language}")
            return None
        if self.codes:  # multi-target Marian: a >>xx<< token chooses the target
            for code in self.codes:
                canonical = canonical_of(code, "m2m100")
                if code == language or (canonical and match_key(canonical) == match_key(language)):
                    return code
            raise LanguageNotSupported(f"{flag} {language}: {self.model} has no >>{language}<< target token; "
                                       f"{self._describe()}")
        if tgt is None:
            raise LanguageNotSupported(
                f"{flag} {language}: cannot tell the language pair of the Marian model {self.model} "
                "(name it like opus-mt-en-de, or set source_lang/target_lang in its tokenizer_config.json)"
            )
        if match_key(tgt)[0] != match_key(language)[0]:
            raise LanguageNotSupported(f"{flag} {language}: {self.model} translates into {tgt} only; "
                                       f"{self._describe()}; use one Marian model per target")
        return None


def _canonical_or_none(code: str | None) -> str | None:
    if not code:
        return None
    try:
        return normalize_language(code)
    except LanguageCodeError:
        return None


def parse_language_list(value: str | list[str], flag: str) -> list[str]:
    """``"de,fr,zh"`` -> canonical codes, in order, without repeats (errors name the flag); family
    spellings (``deu_Latn``, ``de_DE``, ``en_XX``) accepted."""
    return list(parse_languages(value, flag, normalize=_family_code_to_canonical))


def _family_code_to_canonical(text: str) -> str:
    """A user's code, also in a family's spelling (``deu_Latn``, ``de_DE``, ``en_XX``), as canonical BCP-47."""
    if _NLLB_CODE.match(text):
        return normalize_language(text.replace("_", "-"))
    if text.endswith("_XX"):
        return normalize_language(text[:-3])
    return normalize_language(text)
