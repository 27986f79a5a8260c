"""The parts that keep many streams cheap: chunk decoding, pacing, batched accepts, resolving."""

import socket
import sqlite3
import time

import gevent
import pytest
from conftest import auth
from fake_upstream import raw
from hypothesis import given
from hypothesis import strategies as st
from requests.exceptions import ChunkedEncodingError

from relay.serve.worker import ACCEPT_BATCH, BatchAcceptServer
from relay.store.group_commit import GroupCommit
from relay.upstream import resolver
from relay.upstream.chunked import ChunkedBody
from relay.upstream.pacing import LAG_THRESHOLD, PAUSE_PER_LAG, Pacer

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def encode(pieces, trailer=b""):
    """A chunked body: each piece as one chunk (with an extension on the first), then the end."""
    out = b""
    for number, piece in enumerate(pieces):
        extension = b";name=value" if number == 0 else b""
        out += b"%x%s\r\n%s\r\n" % (len(piece), extension, piece)
    return out + b"0\r\n" + trailer + b"\r\n"


def decode_in_parts(data, cuts):
    """Feed data cut at the given offsets, as socket reads would bring it."""
    body = ChunkedBody(None)
    out = b""
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += body.feed(data[start:cut])
        start = cut
    return body, out


@given(
    st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    st.sampled_from([b"", b"X-Trailer: 1\r\n"]),
)
def test_any_split_of_the_framing_gives_the_same_body(pieces, cuts, trailer):
    data = encode(pieces, trailer)
    body, out = decode_in_parts(data, [c for c in cuts if c < len(data)])
    assert out == b"".join(pieces)
    assert body.done and not body.extra


def test_one_read_returns_every_chunk_it_brought():
    body = ChunkedBody(None)
    assert body.feed(b"5\r\nhello\r\n6\r\n world\r\n") == b"hello world"
    assert not body.done
    assert body.feed(b"0\r\n\r\nHTTP/1.1") == b""
    assert body.done and body.extra  # bytes after the end: that connection is not reused


@pytest.mark.parametrize(
    "data",
    [b"zz\r\nhello\r\n", b"5\r\nhello!!\r\n", b"-5\r\nhello\r\n", b"5" * 5000],
    ids=["bad size", "longer than said", "negative", "overlong line"],
)
def test_broken_framing_is_a_chunked_encoding_error(data):
    with pytest.raises(ChunkedEncodingError):
        ChunkedBody(None).feed(data)


def test_a_connection_closed_inside_the_body_is_a_chunked_encoding_error():
    left, right = socket.socketpair()
    with left, right, right.makefile("rb") as fp:
        left.sendall(b"5\r\nhel")
        left.shutdown(socket.SHUT_WR)
        body = ChunkedBody(fp)
        assert body.read() == b"hel"  # what came is passed on at once
        with pytest.raises(ChunkedEncodingError):
            body.read()


def test_streams_give_their_upstream_connection_back(client, make_key, fake):
    key = make_key()
    for _ in range(3):
        reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
        assert reply.get_data().endswith(b"data: [DONE]\n\n")
    assert fake.connections_accepted == 1


def test_an_upstream_sending_past_the_end_gets_a_new_connection(client, make_key, fake):
    key = make_key()
    event = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    fake.queue(raw(head + b"%x\r\n%s\r\n0\r\n\r\ngarbage" % (len(event), event), close=False))
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert reply.get_data() == event
    client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).get_data()
    assert fake.connections_accepted == 2


def test_no_pause_while_the_loop_keeps_up():
    pacer = Pacer(0.25)
    pacer.lag = LAG_THRESHOLD / 2
    assert pacer.pause() == 0.0
    pacer.lag = 0.02
    assert pacer.pause() == pytest.approx(PAUSE_PER_LAG * 0.02)
    pacer.lag = 5.0
    assert pacer.pause() == 0.25


def test_the_sampler_sees_a_blocked_loop():
    pacer = Pacer(0.25)
    sampler = gevent.spawn(pacer._sample)
    gevent.sleep(0.01)
    time.sleep(0.15)  # the real, blocking sleep: nothing else runs, as in an overloaded worker
    gevent.sleep(0.001)  # the sampler wakes ~0.1 s late
    sampler.kill()
    assert pacer.lag >= 0.09
    assert pacer.pause() > 0


def test_pacing_stays_off_without_gevent_patching():
    pacer = Pacer(0.25)
    pacer.start()
    assert pacer._sampler is None


def test_workers_accept_in_batches_whatever_gunicorn_sets():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = BatchAcceptServer(listener, handle=lambda *args: None)
        server.max_accept = 1  # what gunicorn sets with more than one worker
        assert server.max_accept == ACCEPT_BATCH
        server.max_accept = 500
        assert server.max_accept == 500


def test_ip_literals_need_no_resolver():
    assert resolver.addresses("127.0.0.1", 80) == [
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 80))
    ]
    assert resolver.addresses("[::1]", 443)[0][4] == ("::1", 443, 0, 0)
    assert ("127.0.0.1", 80) not in resolver._cache


def test_names_are_resolved_once_per_ttl():
    resolver._cache.pop(("localhost", 8080), None)
    first = resolver.addresses("localhost", 8080)
    assert resolver.addresses("localhost", 8080) is first
    _, found = resolver._cache[("localhost", 8080)]
    resolver._cache[("localhost", 8080)] = (time.monotonic() - 1, found)  # as if TTL passed
    assert resolver.addresses("localhost", 8080) is not first
    assert resolver._cache[("localhost", 8080)][0] > time.monotonic()


class CountingDb:
    """A stand-in for the store's Database: real SQLite in memory, counting transactions."""

    def __init__(self, fail=None):
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        self.conn.execute("CREATE TABLE t (n INTEGER UNIQUE)")
        self.transactions = 0
        self.timeouts = []
        self.fail = fail
        self.write_timeout = 30.0

    def write(self, fn, timeout=None):
        """Run fn in one transaction, as Database.write does (or fail as told)."""
        self.transactions += 1
        self.timeouts.append(timeout)
        if self.fail is not None:
            raise self.fail
        self.conn.execute("BEGIN IMMEDIATE")
        result = fn(self.conn)
        self.conn.execute("COMMIT")
        return result

    def rows(self):
        """The values committed so far."""
        return sorted(n for (n,) in self.conn.execute("SELECT n FROM t"))


def insert(number):
    """An operation: insert one value, return it doubled."""
    return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (number,)) and number * 2


def test_writes_of_calls_ending_together_share_one_commit():
    db = CountingDb()
    commits = GroupCommit(db, batch=True)
    finished = []

    def call_ends(number):
        assert commits.run(insert(number)) == number * 2
        finished.append((number, db.rows()))  # only after its own write is committed

    gevent.joinall([gevent.spawn(call_ends, n) for n in range(5)])
    assert db.transactions == 1 and db.rows() == list(range(5))
    assert all(number in rows for number, rows in finished)


def test_one_failing_write_leaves_the_others_of_its_batch_alone():
    db = CountingDb()
    commits = GroupCommit(db, batch=True)
    outcomes = {}

    def call_ends(number):
        try:
            outcomes[number] = commits.run(insert(1 if number == 3 else number))  # 3 clashes
        except sqlite3.IntegrityError:
            outcomes[number] = "clash"

    gevent.joinall([gevent.spawn(call_ends, n) for n in range(5)])
    assert outcomes == {0: 0, 1: 2, 2: 4, 3: "clash", 4: 8}
    assert db.transactions == 1 and db.rows() == [0, 1, 2, 4]


def test_a_refused_commit_reaches_every_caller_in_it():
    db = CountingDb(fail=sqlite3.OperationalError("attempt to write a readonly database"))
    commits = GroupCommit(db, batch=True)
    errors = []

    def call_ends(number):
        try:
            commits.run(insert(number))
        except sqlite3.Error as exc:
            errors.append(exc)

    gevent.joinall([gevent.spawn(call_ends, n) for n in range(3)])
    assert len(errors) == 3
    assert not commits.leading and not commits.queue


def test_a_leader_commits_its_own_batch_only_and_no_caller_waits_past_its_deadline():
    db = CountingDb()
    commits = GroupCommit(db, batch=True)
    order = []

    def slow_write(fn, timeout=None):
        db.timeouts.append(timeout)
        db.transactions += 1
        gevent.sleep(0.05)  # a busy database: later callers queue meanwhile
        db.conn.execute("BEGIN IMMEDIATE")
        result = fn(db.conn)
        db.conn.execute("COMMIT")
        return result

    db.write = slow_write

    def call_ends(number, delay):
        gevent.sleep(delay)
        commits.run(insert(number))
        order.append((number, db.transactions))

    gevent.joinall(
        [gevent.spawn(call_ends, 0, 0), *(gevent.spawn(call_ends, n, 0.01) for n in (1, 2))]
    )
    assert db.rows() == [0, 1, 2] and db.transactions == 2  # the first, then the other two
    assert order[0] == (0, 1)  # the first caller returned after its own batch, not both
    assert all(0 < t <= db.write_timeout for t in db.timeouts)  # each within its deadline


def test_without_gevent_writes_go_one_by_one():
    db = CountingDb()
    commits = GroupCommit(db, batch=False)
    assert commits.run(insert(1)) == 2 and commits.run(insert(2)) == 4
    assert db.transactions == 2 and db.rows() == [1, 2]


def test_callers_are_woken_even_when_the_committing_greenlet_dies():
    db = CountingDb(fail=RuntimeError("stopped"))  # as a kill at shutdown would, mid-write
    commits = GroupCommit(db, batch=True)
    outcomes = []

    def call_ends(number):
        try:
            commits.run(insert(number))
        except sqlite3.Error:
            outcomes.append("spool")  # what the usage ledger does with the row
        except RuntimeError:
            outcomes.append("leader died")

    gevent.joinall([gevent.spawn(call_ends, n) for n in range(3)], timeout=2)
    assert sorted(outcomes) == ["leader died", "spool", "spool"]
