"""Operator sessions of /admin, kept on the server so that signing out ends them for good."""

import secrets
import time

from relay.store.db import Connection, Database


class SessionStore:
    """Reads and writes the `admin_sessions` table: one row per signed-in browser."""

    def __init__(self, db: Database[Connection]) -> None:
        self.db = db

    def start(self, fingerprint: str, lifetime: float) -> str:
        """A new session for the holder of the token with this fingerprint; its id."""
        sid = secrets.token_urlsafe(32)
        now = time.time()

        def insert(conn: Connection) -> None:
            conn.execute("DELETE FROM admin_sessions WHERE expires_at <= ?", (now,))
            conn.execute(
                "INSERT INTO admin_sessions (id, fingerprint, created_at, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (sid, fingerprint, now, now + lifetime),
            )

        self.db.write(insert)
        return sid

    def valid(self, sid: str, fingerprint: str) -> bool:
        """Whether a session is open, unexpired and made with the current admin token."""
        row = self.db.query_one(
            "SELECT fingerprint FROM admin_sessions WHERE id = ? AND expires_at > ?",
            (sid, time.time()),
        )
        return row is not None and secrets.compare_digest(row["fingerprint"], fingerprint)

    def end(self, sid: str) -> None:
        """Sign a session out: its cookie opens nothing any more, wherever it was copied."""
        self.db.write(lambda conn: conn.execute("DELETE FROM admin_sessions WHERE id = ?", (sid,)))
