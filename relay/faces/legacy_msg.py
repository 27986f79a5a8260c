"""The legacy envelope's `msg` on failures, in RELAY_LEGACY_LANGUAGE (the old services': zh).

`error.message` stays English on both faces (client libraries match its words); `msg` is
what an old PHP client shows its users, so it is said in the operator's language: the
error's own template translated with its values kept, else the sentence of its error code
followed by the English message, so no detail is lost.
"""

from relay.config import ConfigError
from relay.i18n import ENGLISH, N_, TRANSLATIONS, Text, catalog, translated

# What an error code says when its own message has no translation: an HTTP error werkzeug
# named, or a message relay/upstream/ words with values in it.
GENERIC = {
    "invalid_request": N_("The request is invalid: %(detail)s"),
    "invalid_api_key": N_("The API key is wrong: %(detail)s"),
    "model_not_allowed": N_("The model may not be used: %(detail)s"),
    "endpoint_not_allowed": N_("This key may not call this endpoint: %(detail)s"),
    "not_found": N_("No such path: %(detail)s"),
    "method_not_allowed": N_("The method is not allowed: %(detail)s"),
    "request_timeout": N_("The request did not arrive in time: %(detail)s"),
    "request_too_large": N_("The request is too large: %(detail)s"),
    "insufficient_user_quota": N_("The quota is spent: %(detail)s"),
    "rate_limit_exceeded": N_("Too many requests: %(detail)s"),
    "upstream_error": N_("The upstream service failed: %(detail)s"),
    "upstream_timeout": N_("The upstream service timed out: %(detail)s"),
    "service_unavailable": N_("The relay cannot serve right now: %(detail)s"),
    "internal_error": N_("Internal server error: %(detail)s"),
}
OTHER = N_("The request failed (HTTP %(status)d): %(detail)s")
# An upstream's own error, passed through: error.message keeps the upstream's words.
UPSTREAM_SAID = N_("The upstream service answered HTTP %(status)d: %(message)s")
UPSTREAM_SAID_NOTHING = N_("The upstream service answered HTTP %(status)d.")
# relay/upstream/ words these itself; babel.cfg leaves that folder out (it builds some
# messages from parts, which extraction would cut short), so they are marked here.
# tests/test_i18n.py checks that each one is still worded there.
UPSTREAM_MESSAGES = (
    N_("No upstream could take the call."),
    N_("The upstream could not be reached."),
    N_("The upstream did not accept a connection in time."),
    N_("The upstream rejected the relay's credentials; tell the operator."),
    N_("The upstream went silent in the middle of its reply."),
    N_("The upstream broke off its reply."),
)


class LegacyMessages:
    """The `msg` of failed legacy calls, in one language."""

    def __init__(self, language: str) -> None:
        self.language = language
        try:
            self.catalog = catalog(language)
        except FileNotFoundError:
            raise ConfigError(
                f"RELAY_LEGACY_LANGUAGE={language} has no compiled catalog in {TRANSLATIONS}: "
                "run `.venv/bin/pybabel compile -d relay/translations`."
            ) from None

    def error(self, text: Text, code: str, status: int) -> str:
        """The relay's own error: its template translated, else its code's sentence."""
        said = translated(text, self.catalog)
        if said is not None:
            return said
        generic = Text(GENERIC.get(code, OTHER), {"detail": text.english(), "status": status})
        return translated(generic, self.catalog) or text.english()

    def upstream(self, status: int, message: str | None) -> str:
        """An upstream's own error: its message (in English, as it came) and its status."""
        if self.language == ENGLISH and message:
            return message
        if not message:
            text = Text(UPSTREAM_SAID_NOTHING, {"status": status})
        else:
            text = Text(UPSTREAM_SAID, {"status": status, "message": message})
        return translated(text, self.catalog) or text.english()
