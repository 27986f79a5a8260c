"""Talking HTTP to upstreams: the pooled session, URLs, and which headers cross the relay."""

import re
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import quote, unquote

import requests
from requests.adapters import HTTPAdapter
from requests.hooks import default_hooks
from requests.structures import CaseInsensitiveDict

from relay.errors import InvalidRequest

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
}
# Client headers that must not reach the upstream: its key, cookies, where it came from,
# and framing the session recomputes.
DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "api-key",
    "x-api-key",
    "cookie",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "forwarded",
    "x-real-ip",
    "accept-encoding",
    "openai-organization",
    "openai-project",
    "expect",
}
# Upstream headers that must not reach the client: framing of a body requests already
# decoded, the operator's account identifiers and cookies.
DROP_RESPONSE = HOP_BY_HOP | {
    "content-encoding",
    "content-length",
    "set-cookie",
    "openai-organization",
    "openai-project",
    "server",
    "date",
    "alt-svc",
    "strict-transport-security",
    "cf-ray",
    "cf-cache-status",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
}
CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def make_session(pool_size):
    """A requests Session whose pool can hold a connection per concurrent stream."""
    session = requests.Session()
    session.trust_env = False  # never pick up proxies or .netrc credentials from the host
    # One session serves every client: an upstream cookie set for one call must not ride
    # along on another client's call, so the session keeps none.
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


BODY_METHODS = ("POST", "PUT", "PATCH")


def send(session, method, url, headers, body, timeout):
    """Send one request on the pooled session, streaming the reply.

    Builds the PreparedRequest directly: the URL is already quoted by upstream_url
    and the session carries no default headers, params or cookies to merge, and
    Session.request's merging (runtime Protocol checks included) cost about a
    tenth of a relayed call's CPU.
    """
    prepared = requests.PreparedRequest()
    prepared.method = method
    prepared.url = url
    prepared.headers = CaseInsensitiveDict(headers)
    prepared.body = body or None
    if body:
        prepared.headers["Content-Length"] = str(len(body))
    elif method in BODY_METHODS:
        prepared.headers["Content-Length"] = "0"
    prepared.hooks = default_hooks()
    return session.send(prepared, stream=True, timeout=timeout, allow_redirects=False, proxies={})


def upstream_url(base_url, path, query=b""):
    """`<base>/<path>?<query>`, refusing paths that could climb out of the base."""
    decoded = unquote(path)
    segments = decoded.split("/")
    if any(s in (".", "..") for s in segments) or CONTROL.search(decoded):
        raise InvalidRequest(f"Path /v1/{quote(path)} is not allowed.")
    url = f"{base_url}/{quote(decoded, safe='/:@!$&()*+,;=-._~')}"
    if query:
        # Re-quote what must be (spaces, raw non-ASCII) and keep existing %-escapes.
        url += "?" + quote(query, safe="=&+%/:@!$'()*,;?-._~[]")
    return url


def request_headers(client_headers, api_key, content_type=None, stream=False):
    """Headers for the upstream: the client's minus secrets and framing, plus the upstream key."""
    headers = {}
    for name, value in client_headers:
        if name.lower() not in DROP_REQUEST:
            headers[name] = value
    if content_type is not None:
        for name in [n for n in headers if n.lower() == "content-type"]:
            del headers[name]
        headers["Content-Type"] = content_type
    headers["Authorization"] = f"Bearer {api_key}"
    # Compressed event streams are buffered by the compressor; ask for them plain.
    headers["Accept-Encoding"] = "identity" if stream else "gzip, deflate"
    return headers


def response_headers(upstream_headers):
    """Headers to pass back to the client."""
    return [(n, v) for n, v in upstream_headers.items() if n.lower() not in DROP_RESPONSE]
