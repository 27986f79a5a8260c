"""A served request leaves no reference cycle behind: its objects go with their last reference.

Cyclic garbage is freed only by the collector, whose passes cost every worker CPU time in
proportion to how much of it each call leaves; the request the worker's client guard wraps
once made such a cycle on every call (the guard held the request, the request the guard).
"""

import gc
import socket
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http.parser import RequestParser

from relay.serve.client_guard import ClientGuard

BODY = b'{"model":"gpt-4o","messages":[]}'
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"


@pytest.fixture
def no_collector() -> Iterator[None]:
    """Only reference counting frees objects while the test runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def parsed_request(client: socket.socket, server: socket.socket) -> tuple[Any, Any]:
    """gunicorn's own parser and the request it reads from a real socket."""
    client.sendall(HEAD % len(BODY) + BODY)
    parser = RequestParser(Config(), server, ("127.0.0.1", 1))
    return parser, next(parser)


@pytest.mark.parametrize("read", [True, False], ids=["body read", "body left unread"])
def test_a_released_request_and_its_guard_need_no_collector(no_collector, read):
    """After release, dropping the last references frees the request, its body and the guard."""
    client, server = socket.socketpair()
    with client, server:
        parser, req = parsed_request(client, server)
        guarded = ClientGuard(None).guard_body(req)
        if read:
            assert guarded.read() == BODY
        ClientGuard.release(req, guarded)
        assert not guarded.armed
        assert req.body is guarded.raw  # gunicorn drains the rest from its own body
        if not read:
            assert req.body.read() == BODY
        freed = [weakref.ref(obj) for obj in (req, req.body, guarded)]
        del parser, req, guarded
        assert [ref() for ref in freed] == [None, None, None]
