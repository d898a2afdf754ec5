#!/usr/bin/env bash
# Installs what tests/e2e_cluster.rs needs, when it is missing; safe to run again and again.
#   - Debian's redis server (/usr/bin/redis-server), through apt-get (sudo when not root).
#     Only the binary is used: the test runs it as its own child process on a free loopback
#     port with a directory of its own and no persistence; the package's service is left
#     alone.
# Run by hand: bash tests/cluster/setup.sh
set -euo pipefail

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ! -x /usr/bin/redis-server ]; then
    echo "setup: installing Debian's redis-server" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends redis-server >&2
fi
/usr/bin/redis-server --version >&2
