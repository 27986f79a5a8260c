"""Hostile HTTP on raw sockets against real gunicorn: no redirects built from Host."""

import itertools

import pytest
import requests
from conftest import UPSTREAM_KEY, RelayServer, relay_settings
from fake_upstream import FakeUpstream
from raw_http import exchange, request

from relay.app import create_app

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def upstream():
    """One fake upstream for the module's shared relay."""
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    """One relay under gunicorn (one worker) for the cases that need no settings of their own."""
    env = {
        "RELAY_UPSTREAM_BASE_URL": upstream.base_url,
        "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "RELAY_ADMIN_TOKEN": "admin-token-for-hostile-tests",
    }
    server = RelayServer(tmp_path_factory.mktemp("hostile"), env, workers=1).start()
    yield server
    server.stop()


def still_serving(server):
    """The relay answers /healthz, and nothing it logged is a traceback."""
    assert requests.get(server.base_url + "/healthz", timeout=10).status_code == 200
    assert "Traceback" not in server.output()


def rule_url(rule):
    """A URL the rule matches, with `path` converters filled in."""
    url = rule.rule.replace("<path:path>", "chat/completions")
    return url.replace("<path:filename>", "style.css")


def spellings(url):
    """The URL, with its trailing slash toggled, and with each of its slashes doubled."""
    yield url
    yield url[:-1] if url.endswith("/") and url != "/" else url + "/"
    for n, char in enumerate(url):
        if char == "/":
            yield url[:n] + "/" + url[n:]


def test_no_redirect_is_built_from_the_host_header(relay, upstream, tmp_path):
    app = create_app(relay_settings(tmp_path, upstream))
    rules = list(app.url_map.iter_rules())
    app.extensions["relay"].close()
    tried = 0
    for rule in rules:
        url = rule_url(rule)
        paths = list(spellings(url))
        targets = [(path, path) for path in paths] + [(url, "http://evil.example" + url)]
        for (path, target), method in itertools.product(
            targets, rule.methods - {"HEAD", "OPTIONS"}
        ):
            line = f"{method} {target} HTTP/1.1".encode()
            reply = exchange(relay.port, request(line, host=b"evil.example"))
            tried += 1
            assert reply.status not in (301, 302, 303, 307, 308) or (
                reply.headers["location"].startswith("/")  # the app's own, never from Host
            ), (line, reply.raw[:300])
            assert "evil.example" not in reply.headers.get("location", ""), line
            if "//" in path[1:]:  # werkzeug reads a leading // as one slash
                assert reply.status == 404, (line, reply.raw[:300])
                assert reply.json()["error"]["code"] == "not_found"
    # The empty path of an absolute-form target (werkzeug redirected it to http://<Host>/).
    reply = exchange(relay.port, request(b"GET http://evil.example HTTP/1.1", host=b"evil.example"))
    assert reply.status == 200 and "location" not in reply.headers
    assert tried > 100
    still_serving(relay)
