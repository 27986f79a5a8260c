"""GET /v1/models with several upstreams: the union of what they serve (and the key may use)."""

import json
import logging

import urllib3
from flask import current_app

from relay.upstream_http import get

log = logging.getLogger("relay.models")


def fetch_models(state, upstream):
    """One upstream's model list (its first key that answers), or [] when none does."""
    timeout = (
        state.config["UPSTREAM_CONNECT_TIMEOUT"],
        min(state.config["UPSTREAM_READ_TIMEOUT"], 10),
    )
    for target in _targets_of(upstream):
        try:
            status, body = get(
                state.http,
                f"{upstream.base_url}/models",
                {"Authorization": f"Bearer {target.api_key}"},
                timeout,
            )
            if status == 200:
                listing = json.loads(body)
                data = listing.get("data") if isinstance(listing, dict) else None
                return data if isinstance(data, list) else []
        except (ValueError, OSError, urllib3.exceptions.HTTPError) as exc:
            log.warning("models of upstream %s: %s", upstream.name, type(exc).__name__)
    return []


def _targets_of(upstream):
    """Every key of one upstream, as targets."""
    from relay.upstreams import Target

    return [Target(upstream, index) for index in range(len(upstream.keys))]


def models_union(state, key):
    """The merged model list, restricted to models the relay routes there and the key allows."""
    seen = {}
    for upstream in state.router.upstreams:
        for model in fetch_models(state, upstream):
            ident = model.get("id") if isinstance(model, dict) else None
            if not ident or ident in seen:
                continue
            # Only list a model where the router would actually send it.
            if state.router.upstream_for(ident) is not upstream:
                continue
            if key.allows_model(ident):
                seen[ident] = model
    for alias, target in current_app.config["MODEL_ALIASES"].items():
        if target in seen and alias not in seen and key.allows_model(target):
            seen[alias] = {
                "id": alias,
                "object": "model",
                "created": 0,
                "owned_by": f"alias of {target}",
            }
    body = {"object": "list", "data": list(seen.values())}
    return json.dumps(body, ensure_ascii=False).encode()
