"""The pages' language (RELAY_LANGUAGE, else the switch's cookie, else Accept-Language, else
English), the switch, and numbers and dates in the page's locale, through Flask-Babel."""

import datetime as dt
from typing import Any

from babel import Locale
from babel.dates import format_skeleton
from babel.numbers import format_decimal
from flask import Blueprint, Flask, current_app, redirect, request, url_for
from flask_babel import Babel, get_locale, get_translations
from werkzeug.wrappers import Response

from relay import i18n
from relay.errors import NotFound
from relay.web import csrf

bp = Blueprint("language", __name__)
COOKIE = "relay_language"
COOKIE_SECONDS = 365 * 86400
# Where the switch sends the browser back to: the pages that answer GET, named by endpoint.
# Never a URL taken from the request, so the switch cannot redirect anywhere else.
PAGES = ("keyholder.form", "admin.dashboard", "admin.login")
# What a page shows for a number or a time there is none of (an en dash, as the templates do).
NONE = "\u2013"
# Each language named in itself on the switch, as language menus do.
NAMES = {"en": "English", "zh": "简体中文"}


def page_language() -> str:
    """The language of this request's page: the pin, the switch's cookie, the browser's wish."""
    pinned: str | None = current_app.config["LANGUAGE"]
    if pinned:
        return pinned
    chosen = i18n.language(request.cookies.get(COOKIE, ""))
    if chosen is not None:
        return chosen
    return request.accept_languages.best_match(i18n.LANGUAGES, default=i18n.ENGLISH)


@bp.get("/language/<lang>")
def switch(lang: str) -> Response:
    """Remember a language in a cookie (no JavaScript: the switch is a link), then go back."""
    chosen = i18n.language(lang)
    if chosen is None:
        raise NotFound("Unknown language %(lang)r.", lang=lang)
    back = request.args.get("back", "")
    response = redirect(url_for(back if back in PAGES else PAGES[0]))
    # A preference, not a credential: readable by no script, sent on top-level navigation.
    response.set_cookie(
        COOKIE,
        chosen,
        max_age=COOKIE_SECONDS,
        httponly=True,
        samesite="Lax",
        secure=bool(current_app.config["SESSION_COOKIE_SECURE"]),
    )
    return response


bp.after_request(csrf.secure_headers)


def say(text: i18n.Text) -> str:
    """A message (an error's template and values) in the page's language."""
    return i18n.translated(text, get_translations()) or text.english()


def number(value: float | None) -> str:
    """A count with the locale's grouping (1,234,567), or a dash for none."""
    if value is None:
        return NONE
    return format_decimal(value, format="#,##0", locale=locale())


def when(ts: float | None) -> str:
    """A timestamp as the locale writes a UTC date and 24-hour time, or a dash for none."""
    if ts is None:
        return NONE
    try:
        moment = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    except (ValueError, OverflowError, OSError):  # a value stored before it was checked
        return "?"
    return date_time(moment)


def date_time(moment: dt.datetime) -> str:
    """A UTC datetime as the page's locale writes a date and a 24-hour time."""
    where = locale()
    date = format_skeleton("yMMMd", moment, tzinfo=dt.UTC, locale=where)
    time = format_skeleton("Hm", moment, tzinfo=dt.UTC, locale=where)
    return str(where.datetime_formats["medium"]).format(time, date)


def day(value: dt.date) -> str:
    """A day as the page's locale writes a month and a day (a chart's axis label)."""
    return format_skeleton("MMMd", value, locale=locale())


def locale() -> Locale:
    """The page's Babel locale (English outside a request)."""
    found: Locale | None = get_locale()
    return found if found is not None else Locale.parse(i18n.ENGLISH)


def switch_links() -> dict[str, Any]:
    """What base.html needs: the page's `lang`, and the switch's links (none when pinned)."""
    current = str(get_locale() or i18n.ENGLISH)
    links = []
    if not current_app.config["LANGUAGE"]:
        here = request.endpoint or ""
        back = here if here in PAGES else ("admin.dashboard" if here.startswith("admin.") else "")
        for lang in i18n.LANGUAGES:
            url = url_for("language.switch", lang=lang, back=back or None)
            links.append(
                {"lang": lang, "name": NAMES[lang], "url": url, "current": lang == current}
            )
    return {"html_lang": i18n.HTML_LANG.get(current, current), "languages": links}


def init_app(app: Flask) -> None:
    """Flask-Babel on the compiled catalogs in relay/translations, the filters, the switch."""
    Babel(
        app,
        locale_selector=page_language,
        default_translation_directories=i18n.TRANSLATIONS,
        default_domain=i18n.DOMAIN,
        default_timezone="UTC",
    )
    # Multi-line {% trans %} blocks are looked up as extracted: white space collapsed.
    app.jinja_env.policies["ext.i18n.trimmed"] = True
    app.add_template_filter(number, "number")
    app.add_template_filter(when, "when")
    app.context_processor(switch_links)
    app.register_blueprint(bp)
