"""Translations: the catalogs in relay/translations/, and English templates said in a language.

The relay's words are English templates with named `%(name)s` placeholders; a Babel
catalog per language (relay/translations/<lang>/LC_MESSAGES/messages.po, compiled to
.mo) says them in another. The pages pick their language per request (web/language.py,
through Flask-Babel); the legacy face's `msg` uses RELAY_LEGACY_LANGUAGE. Nothing here
imports Flask or Babel (the standard library reads a compiled catalog): gunicorn's master
imports the worker, which shapes its refusals with it.
"""

import functools
import gettext
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

TRANSLATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "translations")
DOMAIN = "messages"
ENGLISH = "en"
# The languages the relay speaks: English (its source language) and Simplified Chinese.
LANGUAGES = (ENGLISH, "zh")
# Other spellings an operator may write for them (lower case, `_` read as `-`).
ALIASES = {"en-us": "en", "en-gb": "en", "zh-cn": "zh", "zh-hans": "zh", "zh-hans-cn": "zh"}
# The `lang` attribute of a page in each language (a font choice for CJK text depends on it).
HTML_LANG = {"en": "en", "zh": "zh-CN"}


def N_(template: str) -> str:  # gettext's name for "mark, translate later"
    """Mark an English template for `pybabel extract`; it is translated where it is shown."""
    return template


@dataclass(frozen=True)
class Text:
    """An English template and the values of its `%(name)s` placeholders (a value may be a
    Text itself: a word said in the same language as the sentence around it)."""

    template: str
    values: Mapping[str, object] = field(default_factory=dict)

    def english(self) -> str:
        """The template filled in, in English."""
        if not self.values:
            return self.template
        return self.template % {
            name: value.english() if isinstance(value, Text) else value
            for name, value in self.values.items()
        }


def language(value: object) -> str | None:
    """One of LANGUAGES for a setting's value (`zh-CN` is `zh`), or None when it is none."""
    word = str(value).strip().lower().replace("_", "-")
    word = ALIASES.get(word, word)
    return word if word in LANGUAGES else None


@functools.cache
def catalog(lang: str) -> gettext.NullTranslations:
    """The compiled catalog of a language (FileNotFoundError without one); English needs none,
    its templates are English."""
    if lang == ENGLISH:
        return gettext.NullTranslations()
    return gettext.translation(DOMAIN, TRANSLATIONS, [lang])


def translated(text: Text, translations: gettext.NullTranslations) -> str | None:
    """The text in the catalog's language with its values filled in; None when the catalog
    lacks its template (English, the source language, has every template)."""
    if not isinstance(translations, gettext.GNUTranslations):
        return text.english()
    template = translations.gettext(text.template)
    if template == text.template:
        return None
    if not text.values:
        return template
    values = {
        name: (translated(value, translations) or value.english())
        if isinstance(value, Text)
        else value
        for name, value in text.values.items()
    }
    try:
        return template % values
    except (KeyError, ValueError, TypeError):
        # A translation whose placeholders do not fit (the catalog test prevents it): say
        # it in English rather than fail the reply.
        return None
