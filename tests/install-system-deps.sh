#!/bin/sh
# Install the system programs the tests drive for real (PHP client, Redis, Chromium and a CJK
# font, PostgreSQL, nginx, systemd-analyze), if missing.
set -eu
need=""
command -v php >/dev/null 2>&1 && php -m 2>/dev/null | grep -qi '^curl$' || need="$need php-cli php-curl"
command -v redis-server >/dev/null 2>&1 || need="$need redis-server"
[ -x /usr/bin/chromium ] || need="$need chromium"
# A CJK font (5 MB), so Chromium draws the Chinese pages (and their screenshots) as text.
fc-list :lang=zh 2>/dev/null | grep -q . || need="$need fonts-wqy-microhei"
# tests/servers.py runs the newest /usr/lib/postgresql/<version>/bin/postgres it finds.
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need="$need postgresql"
# Debian's nginx (core modules: proxy_pass, error_page, limit_req, ssi); /usr/sbin may not be
# on a non-root PATH, hence the full path.
[ -x /usr/sbin/nginx ] || need="$need nginx"
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "tests need:$need (run as root or install them); the tests that use them will be skipped" >&2
        exit 0
    fi
    echo "installing:$need"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi
