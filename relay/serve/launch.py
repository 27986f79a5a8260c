"""`make run`: start gunicorn from the Procfile; with no upstream configured, use the demo one."""

import os
import signal
import socket
import subprocess
import sys
import time

from relay.config import ConfigError, default_instance_path, load_dotenv_file, load_settings
from relay.store import Store

# The checkout: relay/serve/launch.py is three levels below it.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_KEY_NAME = "demo"


def procfile_command() -> str:
    """The `web:` command of the Procfile."""
    with open(os.path.join(ROOT, "Procfile"), encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("web:"):
                return line[4:].strip()
    raise SystemExit("relay: the Procfile has no web: line.")


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 10.0) -> bool:
    """Wait until something listens on a loopback port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def upstream_configured() -> bool:
    """Whether .env, the environment or instance/ names an upstream."""
    load_dotenv_file()
    return bool(
        os.environ.get("RELAY_UPSTREAM_BASE_URL")
        or os.environ.get("RELAY_UPSTREAMS_FILE")
        or os.path.isfile(os.path.join(default_instance_path(), "upstreams.toml"))
    )


def start_demo(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start the demo upstream, point the relay at it, and make a fresh demo key."""
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "relay.serve.demo_upstream", "--port", str(port)], cwd=ROOT
    )
    if not wait_for_port(port):
        demo.kill()
        raise SystemExit("relay: the demo upstream did not start.")
    env["RELAY_UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    env["RELAY_UPSTREAM_API_KEY"] = "demo-upstream-key"
    # A database of its own, so demo keys never work against a real upstream later.
    env.setdefault("RELAY_DATABASE", os.path.join(default_instance_path(), "demo.sqlite"))
    os.environ.update(env)
    return demo, make_demo_key()


def make_demo_key() -> str:
    """Replace the `demo` key in the demo database with a new one and return it."""
    settings = load_settings(default_instance_path())
    store = Store(settings["DATABASE"])
    store.migrate()
    if store.keys.by_name(DEMO_KEY_NAME):
        store.keys.delete(DEMO_KEY_NAME)
    plaintext, _ = store.keys.create(DEMO_KEY_NAME, expires_at=time.time() + 7 * 86400)
    store.close()
    return plaintext


def banner(key: str, port: str) -> str:
    """The loud notice that this is the demo, with a ready-to-paste call."""
    line = "=" * 78
    return f"""
{line}
  DEMO MODE: no upstream is configured, so the relay forwards to its bundled
  local DEMO upstream, which returns canned text, not a language model.
  Configure a real upstream in .env (see .env.example) and run `make run` again.

  Demo key (valid 7 days, demo database only): {key}

  curl http://127.0.0.1:{port}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-3.5-turbo", "messages": [{{"role": "user", "content": "Hello"}}]}}'
{line}
"""


def main() -> None:
    """Run the relay in the foreground until Ctrl-C."""
    os.chdir(ROOT)
    env: dict[str, str] = {}
    demo = None
    if not upstream_configured():
        demo, key = start_demo(env)
        print(banner(key, os.environ.get("PORT", "8000")), flush=True)  # noqa: T201
    else:
        try:
            load_settings(default_instance_path())
        except ConfigError as exc:
            raise SystemExit(f"relay: {exc}") from None
    command = procfile_command()
    print(f"relay: starting {command}", flush=True)  # noqa: T201
    # The Procfile says `gunicorn`: find the one installed beside this Python (the venv).
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    server = subprocess.Popen(
        ["/bin/sh", "-c", "exec " + command], cwd=ROOT, env={**os.environ, **env, "PATH": path}
    )
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGTERM)
        code = server.wait()
    finally:
        if demo is not None:
            demo.terminate()
            demo.wait()
    sys.exit(code)


if __name__ == "__main__":
    main()
