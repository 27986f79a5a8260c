"""The package's layers as the README draws them: imports go down, never up, and never round."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "relay"
# How high each part sits; a module may import only parts at its own height or below.
RANKS = {
    "relay.config": 0,
    "relay.errors": 0,
    "relay.i18n": 0,
    "relay.call": 0,
    "relay.tokens": 0,
    "relay.metering": 0,
    "relay.endpoints": 0,
    "relay.runtime": 0,
    "relay.upstreams_file": 0,
    "relay.upstream": 1,
    "relay.store": 1,
    "relay.limits": 1,
    "relay.state": 2,
    "relay.auth": 2,
    "relay.face": 2,
    "relay.pipeline": 2,
    "relay.faces": 3,
    "relay.web": 3,
    "relay.serve": 3,
    "relay.app": 4,
}
# SQL statements in string literals (upper case, as the store writes them).
SQL = re.compile(
    r"\b(SELECT\s+[\w*(]|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
    r"CREATE\s+(TABLE|INDEX))"
)


def _modules():
    """(dotted name, path) of every module in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _part(name):
    """The ranked part a dotted module name belongs to."""
    for prefix in sorted(RANKS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def _imports(path):
    """Every module name imported anywhere in a file (typing-only imports included)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_every_module_belongs_to_a_layer():
    assert [name for name, _ in _modules() if name != "relay" and _part(name) is None] == []


def test_imports_never_go_up_a_layer():
    upward = []
    for name, path in _modules():
        mine = _part(name)
        if mine is None:
            continue
        for imported in _imports(path):
            theirs = _part(imported)
            if theirs is not None and RANKS[theirs] > RANKS[mine]:
                upward.append(f"{name} -> {imported}")
    assert upward == []


def test_no_cycle_between_the_parts():
    edges = {}
    for name, path in _modules():
        mine = _part(name)
        for imported in _imports(path):
            theirs = _part(imported)
            if mine and theirs and theirs != mine:
                edges.setdefault(mine, set()).add(theirs)

    def reaches(start, goal, seen):
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert [part for part in RANKS if reaches(part, part, {part})] == []


@pytest.mark.parametrize(
    ("library", "home"),
    [
        ("requests", "relay/upstream/"),
        # requests hands urllib3 over in one place: the adapter's pool and Response.raw.
        ("urllib3", "relay/upstream/adapter.py"),
    ],
)
def test_network_libraries_stay_in_the_upstream_layer(library, home):
    users = [
        str(path.relative_to(ROOT))
        for _, path in _modules()
        if any(i == library or i.startswith(library + ".") for i in _imports(path))
    ]
    assert users
    assert [u for u in users if not u.startswith(home)] == []


def test_only_the_store_and_limits_write_sql():
    writers = []
    for _, path in _modules():
        where = str(path.relative_to(ROOT))
        if where.startswith(("relay/store/", "relay/limits/")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and SQL.search(text):
                writers.append(where)
    assert writers == []
