"""The store's maintenance commands: `flask --app app db backup|check|restore|migrate|copy-to`."""

import os
import sqlite3
import sys
from typing import NoReturn

import click
from flask.cli import AppGroup

from relay.config import is_postgres_url
from relay.state import state
from relay.store import StoreError, backup
from relay.store.copy import CopyRefused, copy_store
from relay.store.db import SQLiteDatabase
from relay.store.postgres import PostgresDatabase

db_cli = AppGroup("db", help="Back up, check, restore, migrate or copy the store's database.")
# flask's own options that take a value (`flask --app app db ...`): skipped to find the command.
FLASK_VALUE_OPTIONS = ("--app", "-A", "--env-file", "-e")


def leaves_store_alone(argv: list[str]) -> bool:
    """Whether this process is a `flask ... db` command: the app is then built without
    migrating the store, so a check or a dry run sees it as it is and a restore replaces it
    untouched (app.py asks before building the app)."""
    if not argv:
        return False
    program = argv[0]
    if os.path.basename(program) != "flask" and not program.endswith("flask/__main__.py"):
        return False
    args = iter(argv[1:])
    for arg in args:
        if arg in FLASK_VALUE_OPTIONS:
            next(args, None)
        elif not arg.startswith("-"):
            return arg == "db"
    return False


def fail(message: str) -> NoReturn:
    """Stop with a one-line error on stderr and exit status 1."""
    raise click.ClickException(message)


def sqlite_path(command: str) -> str:
    """RELAY_DATABASE when it is a SQLite file; PostgreSQL has its own tools for this."""
    database = str(state().config["DATABASE"])
    if is_postgres_url(database):
        fail(
            f"db {command} works on a SQLite store; for PostgreSQL use its own tools "
            '(pg_dump, pg_restore, pg_amcheck): README.md, "Backups".'
        )
    return database


def describe(summary: backup.Summary) -> str:
    """One line: integrity, what the file holds, its size."""
    return (
        f"integrity {summary.integrity}; {summary.keys} keys, {summary.usage_rows} usage rows, "
        f"{summary.bytes / 1e6:.1f} MB"
    )


def pending_note(pending: list[str]) -> str:
    """What is left to migrate, and who does it."""
    if not pending:
        return "migrations: none pending"
    return (
        f"migrations pending: {', '.join(pending)} "
        "(the relay applies them when it starts, or run `db migrate`)"
    )


@db_cli.command("backup")
@click.argument("file", type=click.Path(dir_okay=False))
def backup_command(file: str) -> None:
    """Copy the live SQLite store into FILE (a new file), then check the copy.

    Safe while the relay serves: one consistent snapshot, taken in one step; calls go on.
    """
    source = sqlite_path("backup")
    if not os.path.isfile(source):
        fail(f"{source} does not exist: there is no store to back up yet.")
    try:
        summary = backup.backup(source, file)
    except FileExistsError as exc:
        fail(str(exc))
    except (OSError, sqlite3.Error) as exc:
        fail(f"backup of {source} to {file} failed, nothing was kept: {exc}")
    click.echo(f"Backed up {source} to {file} in {summary.seconds:.2f} s: {describe(summary)}.")
    if not summary.sound:
        click.echo("The copy fails its integrity check: do not rely on it.", err=True)
        sys.exit(1)


@db_cli.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
def check_command(file: str | None) -> None:
    """SQLite's integrity check of the store (or of a backup FILE), what it holds, and the
    migrations it has not had. Exits 1 when the check fails."""
    path = file or sqlite_path("check")
    try:
        summary = backup.check(path)
    except FileNotFoundError as exc:
        fail(str(exc))
    click.echo(f"{path}: {describe(summary)}")
    if summary.sound:
        database = SQLiteDatabase(path)
        try:
            click.echo(pending_note(database.pending_migrations()))
        finally:
            database.close()
    else:
        sys.exit(1)


@db_cli.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--force", is_flag=True, help="Restore even though a process (the relay?) has the store open."
)
def restore_command(file: str, force: bool) -> None:
    """Replace the SQLite store with the backup FILE, once FILE passes its integrity check.

    Stop the relay first: the command refuses a store another process has open.
    """
    target = sqlite_path("restore")
    try:
        summary = backup.restore(file, target, force=force)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    except (OSError, sqlite3.Error) as exc:
        fail(f"restore of {file} failed, {target} is as it was: {exc}")
    click.echo(f"Restored {file} into {target}: {describe(summary)}.")
    database = SQLiteDatabase(target)
    try:
        click.echo(pending_note(database.pending_migrations()))
    finally:
        database.close()


@db_cli.command("migrate")
@click.option("--dry-run", is_flag=True, help="List the migrations; change nothing.")
def migrate_command(dry_run: bool) -> None:
    """Apply the migrations the store has not had (the relay also does at start)."""
    store = state().store
    database = str(state().config["DATABASE"])
    if dry_run and not is_postgres_url(database) and not os.path.exists(database):
        click.echo(f"{database} does not exist yet: every migration would run.")
        return
    try:
        pending = store.pending_migrations()
        if not pending:
            click.echo(f"{store.description} is up to date: no migration pending.")
            return
        if dry_run:
            click.echo(f"Would apply to {store.description}: {', '.join(pending)}")
            return
        store.migrate()
        left = store.pending_migrations()
    except StoreError as exc:
        fail(f"migrating {store.description} failed: {exc}")
    finally:
        store.close()
    click.echo(f"Applied to {store.description}: {', '.join(pending)}")
    if left:
        fail(f"still pending: {', '.join(left)}")


@db_cli.command("copy-to")
@click.argument("url")
@click.option(
    "--from",
    "source_path",
    help="The SQLite file to copy (default: RELAY_DATABASE, when it is a SQLite file).",
)
def copy_to(url: str, source_path: str | None) -> None:
    """Copy a SQLite store's keys and usage into the empty PostgreSQL database at URL.

    Key ids, hashes and counters come along, and new ids continue past the copied ones.
    Not copied: calls in flight (refused: stop the relay first) and admin sessions.
    Prints the counts on both sides; exits 1 when they differ.
    """
    if not is_postgres_url(url):
        fail("copy-to needs a postgresql://user:password@host:5432/dbname URL.")
    config = state().config
    source_path = source_path or config["DATABASE"]
    if is_postgres_url(source_path):
        fail("RELAY_DATABASE is not a SQLite file: name the file to copy with --from PATH.")
    if not os.path.isfile(source_path):
        fail(f"{source_path} is not a file: name the SQLite store to copy with --from PATH.")
    source = SQLiteDatabase(source_path)
    target = PostgresDatabase(url, spool_path=config["SPOOL_FILE"])
    try:
        source.migrate()  # an older file gains the columns the target has
        report = copy_store(source, target)
    except CopyRefused as exc:
        fail(str(exc))
    except StoreError as exc:
        fail(f"copy to {target.description} failed, nothing was copied: {exc}")
    finally:
        source.close()
        target.close()
    click.echo(f"Copied {source.description} to {target.description}.")
    click.echo(f"keys: {report.keys[0]} in SQLite, {report.keys[1]} in PostgreSQL")
    click.echo(f"usage rows: {report.usage[0]} in SQLite, {report.usage[1]} in PostgreSQL")
    click.echo(f"next key id: {report.next_key_id}")
    if not report.matches:
        click.echo("The counts differ: do not switch RELAY_DATABASE over yet.", err=True)
        sys.exit(1)
