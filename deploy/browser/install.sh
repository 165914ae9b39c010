#!/usr/bin/env bash
# Headless Chromium and its driver for the dashboard's browser tests (Debian packages).
# Idempotent: does nothing when both are already installed. Needs root (or sudo) to install.
#   deploy/browser/install.sh          install if missing, then print both versions
set -euo pipefail

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${CHROMEDRIVER:-/usr/bin/chromedriver}

if [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]]; then
    echo "chromium and chromedriver already installed"
else
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install chromium chromium-driver" >&2; exit 1; }
        SUDO=sudo
    fi
    export DEBIAN_FRONTEND=noninteractive
    # A stale package list is the usual reason for "Unable to locate package": refresh once and retry.
    $SUDO apt-get install -y --no-install-recommends chromium chromium-driver \
        || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends chromium chromium-driver; }
fi

"$CHROMIUM" --version
"$CHROMEDRIVER" --version
