"""Account-wide upstream endpoints: what one key holder could read or change of another's.

Every relay key calls the operator's one upstream account, so files, batches, stored
completions, vector stores, assistants and the like are shared by all key holders:
one could list and download another's files. These groups are refused unless the
operator opens them for a key (`keys set NAME --endpoints files,batches`) or for every
key (RELAY_OPEN_ENDPOINTS).
"""

# Group name -> upstream path prefixes (a path is in a group when it is one or below one).
GROUPS: dict[str, tuple[str, ...]] = {
    "files": ("files", "uploads"),
    "batches": ("batches",),
    "vector_stores": ("vector_stores",),
    "assistants": ("assistants", "threads"),
    "fine_tuning": ("fine_tuning", "fine-tunes"),
    "organization": ("organization",),
    "evals": ("evals",),
    "containers": ("containers",),
    "stored_completions": ("chat/completions",),  # all but POST chat/completions itself
    "stored_responses": ("responses",),  # all but POST responses itself
    "conversations": ("conversations",),
    # OpenAI's old account billing, but for the relay's own two answers (faces/routes.py).
    "dashboard": ("dashboard",),
}
# Creating a completion or a response is a call, not a read of stored ones.
CALLS = {("POST", "chat/completions"), ("POST", "responses")}


def account_group(path: str, method: str) -> str | None:
    """The account-wide group a call belongs to, or None for a call of its own."""
    if (method, path) in CALLS:
        return None
    for group, prefixes in GROUPS.items():
        if any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes):
            return group
    return None


def parse_groups(value: object, setting: str) -> tuple[str, ...]:
    """A comma-separated list of group names, checked (ValueError names the unknown one)."""
    names = tuple(n.strip() for n in str(value or "").split(",") if n.strip())
    unknown = [n for n in names if n not in GROUPS and n != "all"]
    if unknown:
        raise ValueError(
            f"{setting}: {unknown[0]!r} is not an endpoint group; "
            f"the groups are {', '.join(GROUPS)} (or all)"
        )
    return tuple(GROUPS) if "all" in names else names
