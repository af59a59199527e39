#!/usr/bin/env bash
# Browser test dependencies, idempotent (a second run does nothing):
#   * Debian's Chromium (/usr/bin/chromium), installed with apt-get when missing and we are root;
#   * a LOCAL copy of 3Dmol.js from the npm registry, in the git-ignored .cache/3dmol/
#     (.cache/3dmol/node_modules/3dmol/build/3Dmol-min.js), pinned to the version py3Dmol 2.5.5
#     loads from its CDN, so exported views work offline and tests never touch the network.
# Used by tests/test_browser.py, which skips only when Chromium cannot be had on this machine and
# fails when 3Dmol.js is missing. Failures to install are reported here as warnings (exit 0), so
# that `make test` goes on and the test reports them. From scratch: ~30 s (apt ~25 s, npm ~2 s).
# Overrides: CHROMIUM=/path/to/chromium, THREEDMOL_VERSION=x.y.z (a copy elsewhere: $ABP_3DMOL_JS).
set -euo pipefail
cd "$(dirname "$0")/.."

THREEDMOL_VERSION="${THREEDMOL_VERSION:-2.5.5}"
DEST=".cache/3dmol"                      # where abp_core.viz.local_3dmol_js() looks
JS="$DEST/node_modules/3dmol/build/3Dmol-min.js"
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

# --- 3Dmol.js -------------------------------------------------------------------------------
if [ -s "$JS" ] && grep -q "\"version\": *\"$THREEDMOL_VERSION\"" "$DEST/node_modules/3dmol/package.json" 2>/dev/null; then
    echo "browser_deps: 3Dmol.js $THREEDMOL_VERSION present ($JS)"
elif command -v npm >/dev/null 2>&1; then
    echo "browser_deps: npm install 3dmol@$THREEDMOL_VERSION into $DEST"
    mkdir -p "$DEST"
    # --ignore-scripts: we only need the prebuilt file shipped in the package.
    if npm install --prefix "$DEST" --no-save --no-audit --no-fund --ignore-scripts --loglevel=error \
            "3dmol@$THREEDMOL_VERSION" >/dev/null && [ -s "$JS" ]; then
        echo "browser_deps: 3Dmol.js $THREEDMOL_VERSION installed ($JS)"
    else
        echo "browser_deps: WARNING: npm could not provide $JS; tests/test_browser.py will fail" >&2
    fi
else
    echo "browser_deps: WARNING: npm not found; cannot fetch 3Dmol.js" >&2
fi
