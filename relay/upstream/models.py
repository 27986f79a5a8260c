"""GET /models with several upstreams or an allow-list: the union of what they serve."""

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from requests.exceptions import RequestException

from relay.upstream.client import get
from relay.upstream.routing import Target
from relay.upstreams_file import Upstream

if TYPE_CHECKING:  # the entry point imports this module; typing only
    from relay.upstream import Upstreams

log = logging.getLogger("relay.models")


def fetch_models(upstreams: "Upstreams", upstream: Upstream) -> list[Any]:
    """One upstream's model list (its first key that answers), or [] when none does."""
    timeout = (
        upstreams.config["UPSTREAM_CONNECT_TIMEOUT"],
        min(upstreams.config["UPSTREAM_READ_TIMEOUT"], 10),
    )
    for index in range(len(upstream.keys)):
        target = Target(upstream, index)
        try:
            status, body = get(
                upstreams.http,
                f"{upstream.base_url}/models",
                {"Authorization": f"Bearer {target.api_key}"},
                timeout,
            )
            if status == 200:
                listing = json.loads(body)
                data = listing.get("data") if isinstance(listing, dict) else None
                return data if isinstance(data, list) else []
        except (ValueError, RequestException, OSError) as exc:
            log.warning("models of upstream %s: %s", upstream.name, type(exc).__name__)
    return []


def models_union(
    upstreams: "Upstreams", allows: Callable[[str], bool], aliases: dict[str, str]
) -> bytes:
    """The merged model list, restricted to models the relay routes there and the key allows."""
    seen: dict[str, Any] = {}
    router = upstreams.router
    for upstream in router.upstreams:
        for model in fetch_models(upstreams, upstream):
            ident = model.get("id") if isinstance(model, dict) else None
            if not ident or ident in seen:
                continue
            # Only list a model where the router would actually send it.
            if router.upstream_for(ident) is not upstream:
                continue
            if allows(ident):
                seen[ident] = model
    for alias, target in aliases.items():
        if target in seen and alias not in seen and allows(target):
            seen[alias] = {
                "id": alias,
                "object": "model",
                "created": 0,
                "owned_by": f"alias of {target}",
            }
    body = {"object": "list", "data": list(seen.values())}
    return json.dumps(body, ensure_ascii=False).encode()
