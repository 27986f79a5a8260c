"""The spool: usage rows the database could not take, kept beside it until it can.

Rows are appended one `write` each (O_APPEND, under an exclusive lock), so a row is in
the file whole or not at all. A line that is not a row (torn by a full disk, or
foreign) is moved to `<spool>.rejected` with a log line when the spool is replayed; it
never stops the others. When even the spool cannot be written (a full disk), rows wait
in this process's memory and go first on the next successful write.
"""

import collections
import fcntl
import json
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("relay.usage")
Row = dict[str, Any]
# Rows held in memory at most while neither the database nor the spool takes them.
MAX_HELD = 100_000


class Spool:
    """One spool file, and the rows held in memory when the file cannot be written."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rejected_path = path + ".rejected"
        self.held: collections.deque[Row] = collections.deque(maxlen=MAX_HELD)

    @property
    def failing(self) -> bool:
        """Whether rows are waiting in memory: the spool itself could not be written."""
        return bool(self.held)

    def append(self, row: Row) -> None:
        """Keep a row for later: in the file, else (a full disk) in memory."""
        if self.held or not self._write([row]):
            if len(self.held) == MAX_HELD:
                log.error("usage rows held in memory are at their limit; the oldest is lost")
            self.held.append(row)

    def pending(self) -> bool:
        """Whether any row waits, in the file or in memory."""
        if self.held:
            return True
        try:
            return os.path.getsize(self.path) > 0
        except OSError:
            return False

    def replay(self, settle: Callable[[list[Row]], list[Row]]) -> int:
        """Hand waiting rows to `settle` (which returns the rows it could not take).

        One process replays at a time; the file is truncated (never unlinked: a writer
        may hold it open, waiting for the lock) once its rows are in the database.
        """
        done = self._replay_held(settle)
        try:
            spool = open(self.path, "r+", encoding="utf-8", errors="replace")  # noqa: SIM115
        except FileNotFoundError:
            return done
        with spool:
            try:
                fcntl.flock(spool, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return done  # another worker is replaying it
            rows, bad = _parse(spool.read().splitlines())
            if bad:
                self._reject(bad)
            if rows:
                left = settle(rows)
                if len(left) == len(rows):
                    return done  # the database refused: the file stays as it is
                if left:
                    self._reject([json.dumps(row) for row in left])
            spool.truncate(0)
        if rows:
            log.info("replayed %d spooled usage rows", len(rows))
        return done + len(rows)

    def _replay_held(self, settle: Callable[[list[Row]], list[Row]]) -> int:
        """Rows held in memory go first; any the database refuses go to the file."""
        if not self.held:
            return 0
        rows = list(self.held)
        self.held.clear()
        left = settle(rows)
        if left and not self._write(left):
            self.held.extend(left)
        return len(rows) - len(left)

    def _write(self, rows: list[Row]) -> bool:
        """Append rows, each line in one write; False when the file cannot take them."""
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            log.error("usage spool cannot be opened: %s", exc)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            written = os.write(fd, data)
            if written != len(data):  # a partial write: a full disk took only part of it
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - written)
                return False
            return True
        except OSError as exc:
            log.error("usage spool cannot be written: %s", exc)
            return False
        finally:
            os.close(fd)

    def _reject(self, lines: list[str]) -> None:
        """Move lines that are not rows aside, with a log line."""
        try:
            with open(self.rejected_path, "a", encoding="utf-8") as rejected:
                rejected.write("".join(line + "\n" for line in lines))
        except OSError as exc:
            log.error("%d unreadable spool lines dropped: %s", len(lines), exc)
            return
        log.error("%d unreadable spool lines moved to %s", len(lines), self.rejected_path)


def _parse(lines: list[str]) -> tuple[list[Row], list[str]]:
    """(rows, lines that are not rows) of a spool file's lines."""
    rows, bad = [], []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if isinstance(row, dict) and isinstance(row.get("ts"), int | float):
            rows.append(row)
        else:
            bad.append(line)
    return rows, bad
