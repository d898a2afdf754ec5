#!/usr/bin/env bash
# Installs what tests/e2e_admin.rs needs, when it is missing; safe to run again and again.
#   - Debian's prometheus server (/usr/bin/prometheus), through apt-get (sudo when not
#     root). Only the binary is used: the test runs it as its own child process with a
#     config and a data directory of its own; the package's service is left alone.
# Run by hand: bash tests/admin/setup.sh
set -euo pipefail

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ! -x /usr/bin/prometheus ]; then
    echo "setup: installing Debian's prometheus" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends prometheus >&2
fi
/usr/bin/prometheus --version >&2
