"""Gunicorn hooks for the Procfile: check the config, raise the open-file limit, share metrics."""

import contextlib
import gc
import glob
import os
import resource
import shutil
import sys
import tempfile
from typing import Any

# Plain Python only: importing Flask or urllib3 (and so ssl) here, before the gevent
# workers patch the standard library, would make gevent warn in every worker.
from relay.config import (
    DEFAULTS,
    ConfigError,
    default_instance_path,
    load_dotenv_file,
    load_settings,
)
from relay.upstreams_file import load_upstreams

# Streams are long: gevent workers answer the arbiter's heartbeat from their own
# loop, so `timeout` only catches a truly stuck worker, never a 60 s stream.
timeout = 60


def _graceful_timeout() -> int:
    """RELAY_GRACEFUL_TIMEOUT (.env included): how long a stop or reload lets calls finish.

    Read here because gunicorn takes it from this module; a bad value is reported in one
    sentence by on_starting, which checks every setting.
    """
    load_dotenv_file()
    default = int(str(DEFAULTS["GRACEFUL_TIMEOUT"]))
    try:
        return int(os.environ.get("RELAY_GRACEFUL_TIMEOUT") or default)
    except ValueError:
        return default


# LLM streams run for minutes: a reload or stop lets them finish (up to this long; then
# they end with an error event, and a `shutdown` usage row). deploy/relay.service's
# TimeoutStopSec must be longer.
graceful_timeout = _graceful_timeout()
keepalive = 5  # seconds an idle keep-alive client may wait; also bounds graceful shutdown
# The relay logs its own events; gunicorn's access log stays off unless asked for.
accesslog = None
errorlog = "-"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_made_metrics_dirs: list[str] = []  # removed again when the master exits


def on_starting(server: Any) -> None:
    """Fail fast, in the master, with one sentence when the configuration is wrong."""
    _raise_open_files_limit()
    try:
        load_upstreams(load_settings(default_instance_path()))
    except ConfigError as exc:
        sys.stderr.write(f"relay: {exc}\n")
        sys.exit(1)
    _prepare_metrics_dir()


def _prepare_metrics_dir() -> None:
    """Give the workers one directory for prometheus_client's per-process files.

    Each worker writes its numbers there and /metrics adds up every worker's, whichever
    answers. It must be in the environment before the workers fork and import
    prometheus_client (which picks its storage on import), so it is set here, in the
    master, without importing prometheus_client.
    """
    path = os.environ.get(METRICS_DIR_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        # An earlier run's files would add its old numbers to this run's.
        for name in glob.glob(os.path.join(path, "*.db")):
            os.remove(name)
        return
    path = tempfile.mkdtemp(prefix="relay-metrics-")
    _made_metrics_dirs.append(path)
    os.environ[METRICS_DIR_ENV] = path


def post_worker_init(worker: Any) -> None:
    """Freeze what the worker loaded; say it is about to accept calls (tests wait for it)."""
    # The app, its libraries and their caches live as long as the worker: frozen, they
    # stay out of the collector's full passes, which otherwise walk their ~90 000 objects
    # (~50 ms a pass, a dozen passes per 25 000 calls in a worker under load).
    gc.freeze()
    worker.log.info("relay worker %s ready", worker.pid)


def child_exit(server: Any, worker: Any) -> None:
    """A worker ended: stop counting its streams in the open-streams gauge (a live sum)."""
    if os.environ.get(METRICS_DIR_ENV):
        # Imported only now: prometheus_client picks its storage when first imported, and
        # the workers fork from this process after on_starting set the directory.
        from prometheus_client import multiprocess  # noqa: PLC0415

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the metrics directory this master made (an operator's own one stays)."""
    for path in _made_metrics_dirs:
        shutil.rmtree(path, ignore_errors=True)


def _raise_open_files_limit() -> None:
    """Each stream holds two sockets; the usual soft limit of 1024 would cap streams at ~500."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# gunicorn's runtime control socket is not used; several relays on one host must not share it.
control_socket_disable = True
