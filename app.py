"""Entry point for gunicorn (`app:app`) and the flask CLI (`flask --app app ...`)."""

import sys

from relay.app import create_app
from relay.config import ConfigError
from relay.serve.db_commands import leaves_store_alone

try:
    app = create_app(migrate=not leaves_store_alone(sys.argv))
except ConfigError as exc:
    sys.stderr.write(f"relay: {exc}\n")
    # 3 is gunicorn's "worker failed to boot": the master stops instead of respawning.
    raise SystemExit(3) from None
