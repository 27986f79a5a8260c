"""Operator commands: `flask --app app keys ...`, `usage`, `upstreams check` (and `db ...`,
in db_commands.py)."""

import csv
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
from flask import Flask
from flask.cli import AppGroup, with_appcontext

from relay.serve.db_commands import db_cli
from relay.state import state
from relay.store.keys import KeyStore, utc_minute

# C0 and C1 control characters and DEL.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
keys_cli = AppGroup("keys", help="Create and manage relay keys.")
upstreams_cli = AppGroup("upstreams", help="Inspect the configured upstreams.")


def _keys() -> KeyStore:
    """The app's key store."""
    return state().store.keys


def _fail(message: str) -> NoReturn:
    """Stop with a one-line error on stderr and exit status 1."""
    raise click.ClickException(message)


def _settings(
    quota: int | None,
    rpm: int | None,
    tpm: int | None,
    max_concurrent: int | None,
    models: str | None,
    expires: str | None,
    budget: float | None,
    endpoints: str | None,
) -> dict[str, Any]:
    """Only the options the operator actually gave."""
    given = {
        "quota_tokens": quota,
        "rpm": rpm,
        "tpm": tpm,
        "max_concurrent": max_concurrent,
        "models": models,
        "expires_at": expires,
        "budget": budget,
        "endpoints": endpoints,
    }
    return {k: v for k, v in given.items() if v is not None}


def _limit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by `keys create` and `keys set`."""
    options = [
        click.option("--quota", type=click.IntRange(min=0), help="Token quota (default: none)."),
        click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute."),
        click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute."),
        click.option("--max-concurrent", type=click.IntRange(min=1), help="Calls at once."),
        click.option("--models", help="Comma-separated allow-list; name* matches a prefix."),
        click.option("--expires", help="Expiry date, YYYY-MM-DD (end of day UTC)."),
        click.option("--budget", type=click.FloatRange(min=0), help="Money budget (RELAY_PRICES)."),
        click.option(
            "--endpoints",
            help="Account-wide endpoint groups to open, e.g. files,batches (or all).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@keys_cli.command("create")
@click.argument("name")
@_limit_options
@click.option(
    "--period",
    type=click.Choice(["none", "monthly"]),
    default="none",
    help="monthly: the quota starts again on the 1st of each month (UTC).",
)
@click.option("--key", "key_value", help="Adopt this key string instead of a random one.")
def create_key(
    name: str,
    quota: int | None,
    rpm: int | None,
    tpm: int | None,
    max_concurrent: int | None,
    models: str | None,
    expires: str | None,
    budget: float | None,
    endpoints: str | None,
    period: str,
    key_value: str | None,
) -> None:
    """Create a key; the key itself is printed once, alone on the last line."""
    settings = _settings(quota, rpm, tpm, max_concurrent, models, expires, budget, endpoints)
    settings["quota_period"] = period
    try:
        plaintext, record = _keys().create(name, key=key_value, **settings)
    except ValueError as exc:
        _fail(str(exc))
    click.echo(f"Created key {record.name!r} (id {record.id}). It is shown only now; store it.")
    click.echo(plaintext)


@keys_cli.command("set")
@click.argument("name")
@_limit_options
@click.option("--no-quota", is_flag=True, help="Remove the token quota.")
@click.option("--no-rpm", is_flag=True, help="Remove the key's own request limit.")
@click.option("--no-expiry", is_flag=True, help="Remove the expiry.")
def set_key(
    name: str,
    quota: int | None,
    rpm: int | None,
    tpm: int | None,
    max_concurrent: int | None,
    models: str | None,
    expires: str | None,
    budget: float | None,
    endpoints: str | None,
    no_quota: bool,
    no_rpm: bool,
    no_expiry: bool,
) -> None:
    """Change a key's limits; every worker sees the change on its next request."""
    settings = _settings(quota, rpm, tpm, max_concurrent, models, expires, budget, endpoints)
    for flag, column in ((no_quota, "quota_tokens"), (no_rpm, "rpm"), (no_expiry, "expires_at")):
        if flag:
            settings[column] = None
    try:
        record = _keys().update(name, **settings)
    except (ValueError, LookupError) as exc:
        _fail(str(exc))
    click.echo(f"Updated key {record.name!r}.")


@keys_cli.command("list")
def list_keys() -> None:
    """List keys: name, state, quota, use and limits (never the keys themselves)."""
    rows = []
    for k in _keys().all():
        rows.append(
            [
                k.name,
                "enabled"
                if k.enabled and not k.expired()
                else ("expired" if k.enabled else "disabled"),
                k.key_hint,
                "-" if k.quota_tokens is None else str(k.quota_tokens),
                str(k.used_tokens),
                "-" if k.remaining_tokens is None else str(k.remaining_tokens),
                str(k.rpm or "-"),
                ",".join(k.models) if k.models else "*",
                utc_minute(k.expires_at),
                utc_minute(k.last_used_at),
            ]
        )
    header = [
        "name",
        "state",
        "hint",
        "quota",
        "used",
        "left",
        "rpm",
        "models",
        "expires",
        "last used",
    ]
    _print_table(header, rows)


def _print_table(header: list[str], rows: list[list[Any]]) -> None:
    """Print aligned columns, control characters shown escaped (never sent to the terminal)."""
    cells = [[_printable(v) for v in row] for row in [header, *rows]]
    widths = [max(len(x) for x in column) for column in zip(*cells, strict=False)]
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip())


def _printable(value: Any) -> str:
    """A value as text with control characters escaped: names come from clients and
    upstreams, and a raw escape sequence would drive the operator's terminal."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))


def _csv_cell(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs as a formula (text starting with = + - @ and
    the like gets a leading apostrophe); numbers stay numbers."""
    if isinstance(value, str) and value[:1] in FORMULA_STARTS:
        return "'" + value
    return value


def _change(action: str, name: str, *args: Any) -> Any:
    """Run a KeyStore change and report it."""
    try:
        return getattr(_keys(), action)(name, *args)
    except (ValueError, LookupError) as exc:
        _fail(str(exc))


@keys_cli.command("disable")
@click.argument("name")
def disable_key(name: str) -> None:
    """Disable a key (its next request is refused, in every worker)."""
    _change("set_enabled", name, False)
    click.echo(f"Disabled key {name!r}.")


@keys_cli.command("enable")
@click.argument("name")
def enable_key(name: str) -> None:
    """Enable a disabled key."""
    _change("set_enabled", name, True)
    click.echo(f"Enabled key {name!r}.")


@keys_cli.command("delete")
@click.argument("name")
def delete_key(name: str) -> None:
    """Delete a key: it stops working at once; its calls keep naming it (as `NAME (deleted)`)."""
    _change("delete", name)
    click.echo(f"Deleted key {name!r}.")


@keys_cli.command("topup")
@click.argument("name")
@click.argument("tokens", type=click.IntRange(min=1))
def topup_key(name: str, tokens: int) -> None:
    """Add TOKENS to a key's quota."""
    record = _change("top_up", name, tokens)
    click.echo(
        f"Key {name!r}: quota {record.quota_tokens}, used {record.used_tokens}, "
        f"remaining {record.remaining_tokens}."
    )


@click.command("usage")
@with_appcontext
@click.option("--key", "key_name", help="Only this key (by name).")
@click.option("--model", help="Only this model (as served).")
@click.option("--since", help="From this date (YYYY-MM-DD, UTC), inclusive.")
@click.option("--until", help="Up to this date (YYYY-MM-DD, UTC), inclusive.")
@click.option(
    "--by",
    type=click.Choice(["day", "key", "model"]),
    multiple=True,
    help="Group by these (default: day, key, model).",
)
@click.option("--csv", "as_csv", is_flag=True, help="Write CSV to standard output.")
@click.option("--rows", "raw_rows", is_flag=True, help="One line per call instead of a summary.")
def usage_command(
    key_name: str | None,
    model: str | None,
    since: str | None,
    until: str | None,
    by: tuple[str, ...],
    as_csv: bool,
    raw_rows: bool,
) -> None:
    """Summarise usage by key, model and day (filters and CSV export)."""
    try:
        header, rows = state().store.summarise(
            key=key_name,
            model=model,
            since=since,
            until=until,
            group_by=by or ("day", "key", "model"),
            raw=raw_rows,
        )
    except ValueError as exc:
        _fail(str(exc))
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows([_csv_cell(v) for v in row] for row in rows)
        return
    if not rows:
        click.echo("No usage recorded for that selection.")
        return
    _print_table(header, [["-" if v is None else v for v in row] for row in rows])


@upstreams_cli.command("check")
def check_upstreams() -> None:
    """Call GET /models on every upstream key and report what answers."""
    results = state().upstreams.check()
    for label, answer in results:
        click.echo(f"{label}: {answer}")
    if any(answer != "ok" for _, answer in results):
        sys.exit(1)


def init_app(app: Flask) -> None:
    """Register the command groups."""
    app.cli.add_command(db_cli)
    app.cli.add_command(keys_cli)
    app.cli.add_command(upstreams_cli)
    app.cli.add_command(usage_command)
