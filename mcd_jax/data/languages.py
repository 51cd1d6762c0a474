"""Language codes the data layer accepts, with their English names.

Every example carries one language code. Codes are ISO 639-1 where the
language has one. Languages without an ISO 639-1 code that public benchmarks
use (MultiQ has several) get their ISO 639-3 code. A code may carry one
BCP 47 subtag for a script (`mni-Mtei`) or a region (`zh-TW`, `zh-CN`).
Deprecated codes that datasets still use (`iw` for Hebrew, `jw` for Javanese)
are mapped to the current code by `canonical_language`.
"""

from __future__ import annotations

import difflib
import re

# ISO 639-1 (all 183 current two-letter codes) with English names.
ISO_639_1: dict[str, str] = {
    "aa": "Afar",
    "ab": "Abkhazian",
    "ae": "Avestan",
    "af": "Afrikaans",
    "ak": "Akan",
    "am": "Amharic",
    "an": "Aragonese",
    "ar": "Arabic",
    "as": "Assamese",
    "av": "Avaric",
    "ay": "Aymara",
    "az": "Azerbaijani",
    "ba": "Bashkir",
    "be": "Belarusian",
    "bg": "Bulgarian",
    "bi": "Bislama",
    "bm": "Bambara",
    "bn": "Bengali",
    "bo": "Tibetan",
    "br": "Breton",
    "bs": "Bosnian",
    "ca": "Catalan",
    "ce": "Chechen",
    "ch": "Chamorro",
    "co": "Corsican",
    "cr": "Cree",
    "cs": "Czech",
    "cu": "Church Slavic",
    "cv": "Chuvash",
    "cy": "Welsh",
    "da": "Danish",
    "de": "German",
    "dv": "Dhivehi",
    "dz": "Dzongkha",
    "ee": "Ewe",
    "el": "Greek",
    "en": "English",
    "eo": "Esperanto",
    "es": "Spanish",
    "et": "Estonian",
    "eu": "Basque",
    "fa": "Persian",
    "ff": "Fulah",
    "fi": "Finnish",
    "fj": "Fijian",
    "fo": "Faroese",
    "fr": "French",
    "fy": "Western Frisian",
    "ga": "Irish",
    "gd": "Scottish Gaelic",
    "gl": "Galician",
    "gn": "Guarani",
    "gu": "Gujarati",
    "gv": "Manx",
    "ha": "Hausa",
    "he": "Hebrew",
    "hi": "Hindi",
    "ho": "Hiri Motu",
    "hr": "Croatian",
    "ht": "Haitian Creole",
    "hu": "Hungarian",
    "hy": "Armenian",
    "hz": "Herero",
    "ia": "Interlingua",
    "id": "Indonesian",
    "ie": "Interlingue",
    "ig": "Igbo",
    "ii": "Sichuan Yi",
    "ik": "Inupiaq",
    "io": "Ido",
    "is": "Icelandic",
    "it": "Italian",
    "iu": "Inuktitut",
    "ja": "Japanese",
    "jv": "Javanese",
    "ka": "Georgian",
    "kg": "Kongo",
    "ki": "Kikuyu",
    "kj": "Kuanyama",
    "kk": "Kazakh",
    "kl": "Kalaallisut",
    "km": "Khmer",
    "kn": "Kannada",
    "ko": "Korean",
    "kr": "Kanuri",
    "ks": "Kashmiri",
    "ku": "Kurdish",
    "kv": "Komi",
    "kw": "Cornish",
    "ky": "Kyrgyz",
    "la": "Latin",
    "lb": "Luxembourgish",
    "lg": "Ganda",
    "li": "Limburgish",
    "ln": "Lingala",
    "lo": "Lao",
    "lt": "Lithuanian",
    "lu": "Luba-Katanga",
    "lv": "Latvian",
    "mg": "Malagasy",
    "mh": "Marshallese",
    "mi": "Maori",
    "mk": "Macedonian",
    "ml": "Malayalam",
    "mn": "Mongolian",
    "mr": "Marathi",
    "ms": "Malay",
    "mt": "Maltese",
    "my": "Burmese",
    "na": "Nauru",
    "nb": "Norwegian Bokmal",
    "nd": "North Ndebele",
    "ne": "Nepali",
    "ng": "Ndonga",
    "nl": "Dutch",
    "nn": "Norwegian Nynorsk",
    "no": "Norwegian",
    "nr": "South Ndebele",
    "nv": "Navajo",
    "ny": "Chichewa",
    "oc": "Occitan",
    "oj": "Ojibwa",
    "om": "Oromo",
    "or": "Odia",
    "os": "Ossetian",
    "pa": "Punjabi",
    "pi": "Pali",
    "pl": "Polish",
    "ps": "Pashto",
    "pt": "Portuguese",
    "qu": "Quechua",
    "rm": "Romansh",
    "rn": "Rundi",
    "ro": "Romanian",
    "ru": "Russian",
    "rw": "Kinyarwanda",
    "sa": "Sanskrit",
    "sc": "Sardinian",
    "sd": "Sindhi",
    "se": "Northern Sami",
    "sg": "Sango",
    "si": "Sinhala",
    "sk": "Slovak",
    "sl": "Slovenian",
    "sm": "Samoan",
    "sn": "Shona",
    "so": "Somali",
    "sq": "Albanian",
    "sr": "Serbian",
    "ss": "Swati",
    "st": "Southern Sotho",
    "su": "Sundanese",
    "sv": "Swedish",
    "sw": "Swahili",
    "ta": "Tamil",
    "te": "Telugu",
    "tg": "Tajik",
    "th": "Thai",
    "ti": "Tigrinya",
    "tk": "Turkmen",
    "tl": "Tagalog",
    "tn": "Tswana",
    "to": "Tongan",
    "tr": "Turkish",
    "ts": "Tsonga",
    "tt": "Tatar",
    "tw": "Twi",
    "ty": "Tahitian",
    "ug": "Uyghur",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "uz": "Uzbek",
    "ve": "Venda",
    "vi": "Vietnamese",
    "vo": "Volapuk",
    "wa": "Walloon",
    "wo": "Wolof",
    "xh": "Xhosa",
    "yi": "Yiddish",
    "yo": "Yoruba",
    "za": "Zhuang",
    "zh": "Chinese",
    "zu": "Zulu",
}

# ISO 639-3 codes for languages that have no ISO 639-1 code but appear in
# public multilingual benchmarks.
ISO_639_3_EXTRA: dict[str, str] = {
    "bho": "Bhojpuri",
    "ceb": "Cebuano",
    "ckb": "Central Kurdish",
    "doi": "Dogri",
    "fil": "Filipino",
    "gom": "Goan Konkani",
    "haw": "Hawaiian",
    "hmn": "Hmong",
    "ilo": "Iloko",
    "kri": "Krio",
    "lus": "Mizo",
    "mai": "Maithili",
    "mni": "Manipuri",
    "nso": "Northern Sotho",
}

LANGUAGES: dict[str, str] = {**ISO_639_1, **ISO_639_3_EXTRA}
"""Every primary language code `canonical_language` accepts, mapped to its English name."""

# Withdrawn ISO 639-1 codes (iw, in, ji) and Google Translate's `jw`, mapped
# to the current code for the same language.
DEPRECATED_LANGUAGES: dict[str, str] = {"iw": "he", "in": "id", "ji": "yi", "jw": "jv"}

_SUBTAG = re.compile(r"^(?:[A-Za-z]{4}|[A-Za-z]{2}|[0-9]{3})$")


def canonical_language(code: str) -> str:
    """Validate a language code and return its canonical spelling.

    The primary subtag is lower-cased and a deprecated code is replaced by the
    current one ("iw" -> "he"). An optional second subtag is written as a BCP 47
    script ("Mtei") or region ("TW", "419").

    Args:
      code: a code such as "en", "EN", "iw", "zh-tw" or "mni-Mtei".

    Returns:
      The canonical code, e.g. "en", "he", "zh-TW", "mni-Mtei".

    Raises:
      ValueError: the code is not a string, its primary subtag is not in
        `LANGUAGES`, or its second subtag is neither a script nor a region.
        The message lists close matches among the known codes.
    """
    if not isinstance(code, str) or not code.strip():
        raise ValueError(
            f"invalid language code {code!r}: expected an ISO 639-1 code such as 'en' or 'de'"
        )

    primary, _, subtag = code.strip().replace("_", "-").partition("-")
    primary = primary.lower()
    primary = DEPRECATED_LANGUAGES.get(primary, primary)
    if primary not in LANGUAGES:
        raise ValueError(_unknown_language_message(code))

    if not subtag:
        return primary
    if not _SUBTAG.match(subtag):
        raise ValueError(
            f"invalid language code {code!r}: the part after '-' must be a 4-letter script "
            f"(e.g. 'mni-Mtei') or a region (e.g. 'zh-TW'); use {primary!r} for the language alone"
        )
    subtag = subtag.title() if len(subtag) == 4 else subtag.upper()
    return f"{primary}-{subtag}"


def language_name(code: str) -> str:
    """Return the English name of a language code, e.g. "zh-TW" -> "Chinese (TW)".

    Raises:
      ValueError: the code is unknown (see `canonical_language`).
    """
    canonical = canonical_language(code)
    primary, _, subtag = canonical.partition("-")
    name = LANGUAGES[primary]
    return f"{name} ({subtag})" if subtag else name


def _unknown_language_message(code: str) -> str:
    lowered = code.strip().lower()
    by_code = difflib.get_close_matches(lowered, LANGUAGES, n=4, cutoff=0.5)
    names = {name.lower(): key for key, name in LANGUAGES.items()}
    by_name = [names[name] for name in difflib.get_close_matches(lowered, names, n=3)]
    matches = list(dict.fromkeys(by_name + by_code))[:4]

    hint = ", ".join(f"{match!r} ({LANGUAGES[match]})" for match in matches)
    suggestion = f"close matches: {hint}" if matches else "no close match"
    return (
        f"unknown language code {code!r} ({suggestion}); use an ISO 639-1 code, or an "
        "ISO 639-3 code for a language without one (see mcd_jax.data.languages.LANGUAGES)"
    )
