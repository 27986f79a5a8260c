"""Calls in flight: a row per call from admission to its usage row, holding its reservation.

A call reserves its likely cost when it is admitted, in the same transaction that
checks the key's quota, so parallel calls (in every worker) see each other's
reservations. A call that states max_tokens is admitted only with room for its prompt
and all of max_tokens; one that does not is admitted while there is room for its prompt
and reserves the default or all the room that is left. Once the room is reserved, every
further call is refused until one settles: the quota is overrun by the calls' errors of
estimate at most, never by the number of calls in flight. The call's usage row replaces the
in-flight row when it ends. If its worker dies first, the next worker that starts turns
the row into a usage row with outcome `worker_lost` (see `lost_rows`).
"""

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.metering import Need
from relay.store.db import Connection
from relay.store.rows import USAGE_COLUMNS, Row

# How long a row of another host may stay in flight before it counts as lost: longer
# than any call (streams of hours included), short enough to free a dead host's quota.
FOREIGN_ROW_SECONDS = 6 * 3600
Alive = Callable[[int], bool]  # whether a process of this machine is still running
# A call's usage row, or (a `worker_lost` row recovered while this one waited in the
# spool) the same call's row replaced: one row per call id, however often it is settled.
UPSERT_USAGE = (
    f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) "  # noqa: S608 - constant column list
    f"VALUES ({', '.join('?' for _ in USAGE_COLUMNS)}) ON CONFLICT (call_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in USAGE_COLUMNS if c != "call_id")
)
# The key is charged the row's tokens and cost less what an earlier row of the same call
# (if any) charged: run before the upsert, it reads that row as it was.
SETTLE_KEY = (
    "UPDATE keys SET "
    "used_tokens = used_tokens + ? - COALESCE((SELECT charged_tokens FROM usage "
    "WHERE call_id = ?), 0), "
    "spent = spent + ? - COALESCE((SELECT cost FROM usage WHERE call_id = ?), 0), "
    "last_used_at = CASE WHEN last_used_at > ? THEN last_used_at ELSE ? END WHERE id = ?"
)


@dataclass(frozen=True)
class Refusal:
    """Why a call did not fit in its key's quota or budget, with the numbers to show."""

    what: str  # "tokens" or "budget"
    limit: float
    used: float
    held: float  # reserved by the key's calls in flight
    needed: float  # the least this call needs (its prompt, and max_tokens when it sets one)


def process_alive(pid: int) -> bool:
    """Whether a process of this machine is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def host_id() -> str:
    """This machine and boot: `hostname/boot id` (a process id means nothing elsewhere)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()[:8]
    except OSError:
        boot = "-"
    return f"{socket.gethostname()}/{boot}"


def admit(
    conn: Connection,
    call_id: str,
    key_id: int,
    need: Need,
    draft: Row,
    host: str,
    lock_row: str = "",
    metered: bool = True,
) -> Refusal | None:
    """Insert the call's in-flight row, reserving what it may use or the room that is left;
    a Refusal when the key's quota or budget has no room even for its prompt.

    `lock_row` (the dialect's) holds a metered key's row until the transaction ends, so
    every instance checking this key's quota waits for this reservation (SQLite: the write
    lock of BEGIN IMMEDIATE already does). There, a key that had no quota or budget when
    the call was authenticated (`metered` False) reserves without reading its row: the
    insert needs no answer, so a batch of such calls costs PostgreSQL one round trip.
    """
    if lock_row and not metered:
        _reserve(conn, call_id, key_id, need.tokens, need.cost, draft, host)
        return None
    read = "SELECT quota_tokens, used_tokens, budget, spent FROM keys WHERE id = ?"
    key = conn.execute(read, (key_id,)).fetchone()
    if key is not None and lock_row and (key[0] is not None or key[2] is not None):
        # A metered key: read again under its row lock. An unmetered one needs no lock, so
        # its calls never queue behind each other's transactions.
        key = conn.execute(read + lock_row, (key_id,)).fetchone()
    if key is None:
        raise LookupError(f"key #{key_id} is gone")
    quota, used, budget, spent = key[0], key[1], key[2], key[3]
    tokens, cost = need.tokens, need.cost
    if quota is not None or budget is not None:
        held_tokens, held_cost = conn.execute(
            "SELECT CAST(COALESCE(SUM(reserved_tokens), 0) AS BIGINT), "
            "COALESCE(SUM(reserved_cost), 0) "
            "FROM inflight WHERE key_id = ?",
            (key_id,),
        ).fetchone()
        if quota is not None:
            room = quota - used - held_tokens
            if room <= 0 or room < need.least_tokens:
                return Refusal("tokens", quota, used, held_tokens, need.least_tokens)
            tokens = min(tokens, room)
        if budget is not None:
            money_room = budget - spent - held_cost
            if money_room <= 0 or money_room < need.least_cost:
                return Refusal("budget", budget, spent, held_cost, need.least_cost)
            cost = min(cost, money_room)
    _reserve(conn, call_id, key_id, tokens, cost, draft, host)
    return None


def _reserve(
    conn: Connection, call_id: str, key_id: int, tokens: int, cost: float, draft: Row, host: str
) -> None:
    """Insert a call's in-flight row holding its reservation."""
    now = time.time()
    conn.execute(
        "INSERT INTO inflight (call_id, key_id, reserved_tokens, reserved_cost, host, pid, "
        "started_at, updated_at, draft) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (call_id, key_id, tokens, cost, host, os.getpid(), now, now, json.dumps(draft)),
    )


def progress(conn: Connection, call_id: str, draft: Row) -> None:
    """Note what a running call has done so far, for the row written if its worker dies."""
    conn.execute(
        "UPDATE inflight SET draft = ?, updated_at = ? WHERE call_id = ?",
        (json.dumps(draft), time.time(), call_id),
    )


def settle(conn: Connection, row: Row) -> None:
    """Write a call's usage row, charge its key and end its reservation (idempotent).

    A row already written for the same call (a `worker_lost` row recovered while this
    one waited in the spool) is replaced, and the key is charged the difference. No
    statement's result is needed, so PostgreSQL gets all three in one round trip.
    """
    call_id = row["call_id"]
    if row["key_id"] is not None:
        charge = (row["charged_tokens"], call_id, row["cost"], call_id, row["ts"], row["ts"])
        conn.execute(SETTLE_KEY, (*charge, row["key_id"]))
    conn.execute(UPSERT_USAGE, tuple(row[c] for c in USAGE_COLUMNS))
    conn.execute("DELETE FROM inflight WHERE call_id = ?", (call_id,))


def lost_rows(
    conn: Connection, host: str, alive: Alive, now: float | None = None
) -> list[tuple[dict[str, Any], float]]:
    """(draft, last update) of in-flight rows whose worker is gone: dead on this host, or a
    row of another host (or an earlier boot of this one) left far longer than any call."""
    now = time.time() if now is None else now
    lost = []
    for owner, pid, updated, draft in conn.execute(
        "SELECT host, pid, updated_at, draft FROM inflight"
    ).fetchall():
        same_machine = owner.partition("/")[0] == host.partition("/")[0]
        if owner == host:
            gone = not alive(pid)
        elif same_machine:
            gone = True  # written before this machine's last reboot
        else:
            gone = now - updated > FOREIGN_ROW_SECONDS
        if gone:
            lost.append((json.loads(draft), updated))
    return lost
