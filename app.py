"""Entry point for gunicorn (`app:app`) and the flask CLI (`flask --app app ...`)."""

import sys

from relay.app import create_app
from relay.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    sys.stderr.write(f"relay: {exc}\n")
    # 3 is gunicorn's "worker failed to boot": the master stops instead of respawning.
    raise SystemExit(3) from None
