#!/usr/bin/env bash
# Installs what tests/browser.rs needs, when it is missing; safe to run again and again.
#   - Debian's chromium (/usr/bin/chromium), through apt-get (sudo when not root);
#   - Node.js and npm, through apt-get, only if the machine has none;
#   - playwright-core, pinned by package-lock.json, into tests/browser/node_modules.
# Run by hand: bash tests/browser/setup.sh
set -euo pipefail
cd "$(dirname "$0")"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=no
apt_install() {
    if [ "$apt_updated" = no ]; then
        as_root apt-get update -qq
        apt_updated=yes
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

if [ ! -x /usr/bin/chromium ]; then
    echo "setup: installing Debian's chromium" >&2
    apt_install chromium
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "setup: installing Node.js and npm" >&2
    apt_install nodejs npm
fi
if [ ! -f node_modules/playwright-core/package.json ]; then
    echo "setup: installing playwright-core from package-lock.json" >&2
    npm ci --no-audit --no-fund --loglevel=error >&2
fi
/usr/bin/chromium --version >&2
