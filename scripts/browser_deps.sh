#!/usr/bin/env bash
# Browser test dependencies, idempotent (a second run does nothing):
#   * Debian's Chromium (/usr/bin/chromium), installed with apt-get when missing and we are root;
#   * a LOCAL copy of 3Dmol.js from the npm registry (scripts/fetch_3dmol.sh: package data
#     abp_core/static/3dmol/, pinned to the version py3Dmol 2.5.5 loads from its CDN), so views work
#     offline and tests never touch the network.
# Used by tests/test_browser.py and tests/test_jupyterlab.py, which skip only when Chromium cannot be
# had on this machine and fail when 3Dmol.js is missing. Failures to install are reported here as
# warnings (exit 0), so that `make test` goes on and the tests report them. From scratch: ~30 s (apt ~25 s, npm ~2 s).
# Overrides: CHROMIUM=/path/to/chromium, THREEDMOL_VERSION=x.y.z (a copy elsewhere: $ABP_3DMOL_JS).
# Playwright (PyPI, a dev dependency) drives this Chromium; it never downloads a browser of its own.
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

# --- Chromium -------------------------------------------------------------------------------
if [ -x "$CHROMIUM" ]; then
    echo "browser_deps: chromium present ($CHROMIUM)"
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "browser_deps: installing Debian's chromium with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine has no (or stale) package lists: update, then install.
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
        echo "browser_deps: $("$CHROMIUM" --version 2>/dev/null || echo 'chromium installed')"
    else
        echo "browser_deps: WARNING: apt-get could not install chromium; tests/test_browser.py will be skipped" >&2
    fi
else
    echo "browser_deps: WARNING: $CHROMIUM missing and apt-get not usable as root;" \
         "tests/test_browser.py will be skipped" >&2
fi

# --- 3Dmol.js (npm; also run by `make install`) -------------------------------------------
bash scripts/fetch_3dmol.sh
