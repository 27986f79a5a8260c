"""Gunicorn hooks for the Procfile: check the config before forking, raise the open-file limit."""

import contextlib
import resource
import sys

# Streams are long: gevent workers answer the arbiter's heartbeat from their own
# loop, so `timeout` only catches a truly stuck worker, never a 60 s stream.
timeout = 60
graceful_timeout = 30
keepalive = 5  # seconds an idle keep-alive client may wait; also bounds graceful shutdown
# The relay logs its own events; gunicorn's access log stays off unless asked for.
accesslog = None
errorlog = "-"


def on_starting(server):
    """Fail fast, in the master, with one sentence when the configuration is wrong.

    Only plain-Python checks run here: importing Flask (and so ssl) before the
    gevent workers patch the standard library would make gevent warn.
    """
    from relay.config import ConfigError, default_instance_path, load_settings
    from relay.upstreams import load_upstreams

    _raise_open_files_limit()
    try:
        load_upstreams(load_settings(default_instance_path()))
    except ConfigError as exc:
        sys.stderr.write(f"relay: {exc}\n")
        sys.exit(1)


def _raise_open_files_limit():
    """Each stream holds two sockets; the usual soft limit of 1024 would cap streams at ~500."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# gunicorn's runtime control socket is not used; several relays on one host must not share it.
control_socket_disable = True
