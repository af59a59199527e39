#!/usr/bin/env bash
# A LOCAL copy of 3Dmol.js for the 3D views, idempotent (a second run does nothing).
#   npm registry package 3dmol, pinned to the version py3Dmol 2.5.5 loads from its CDN, installed into
#   the git-ignored .cache/3dmol/ and copied, with its licence (BSD-3-Clause), into the package data
#   folder abp_core/static/3dmol/ (git-ignored too), where abp_core.threedmol.local_3dmol_js() finds it
#   and the Jupyter server extension abp_core.jupyter_static serves it to notebooks.
# Run by `make install`, binder/postBuild and scripts/browser_deps.sh. Without npm (or offline) it
# warns and exits 0: views then fall back to the CDN, with a note saying so. ~2 s.
# Overrides: THREEDMOL_VERSION=x.y.z.
set -euo pipefail
cd "$(dirname "$0")/.."

THREEDMOL_VERSION="${THREEDMOL_VERSION:-2.5.5}"
NPM_DIR=".cache/3dmol"
BUILD="$NPM_DIR/node_modules/3dmol/build"
PKG_DIR="abp_core/static/3dmol"

have_version() {
    grep -q "\"version\": *\"$THREEDMOL_VERSION\"" "$NPM_DIR/node_modules/3dmol/package.json" 2>/dev/null \
        && [ -s "$BUILD/3Dmol-min.js" ]
}

if have_version; then
    echo "fetch_3dmol: 3Dmol.js $THREEDMOL_VERSION present ($BUILD/3Dmol-min.js)"
elif command -v npm >/dev/null 2>&1; then
    echo "fetch_3dmol: npm install 3dmol@$THREEDMOL_VERSION into $NPM_DIR"
    mkdir -p "$NPM_DIR"
    # --ignore-scripts: only the prebuilt file shipped in the package is needed.
    if ! npm install --prefix "$NPM_DIR" --no-save --no-audit --no-fund --ignore-scripts --loglevel=error \
            "3dmol@$THREEDMOL_VERSION" >/dev/null || ! have_version; then
        echo "fetch_3dmol: WARNING: npm could not provide 3Dmol.js $THREEDMOL_VERSION;" \
             "3D views will load it from the internet" >&2
        exit 0
    fi
else
    echo "fetch_3dmol: WARNING: npm not found; 3D views will load 3Dmol.js from the internet" >&2
    exit 0
fi

mkdir -p "$PKG_DIR"
if ! cmp -s "$BUILD/3Dmol-min.js" "$PKG_DIR/3Dmol-min.js"; then
    # copy next to the target, then rename: a reader never sees half a file
    cp "$BUILD/3Dmol-min.js" "$PKG_DIR/.3Dmol-min.js.tmp" && mv "$PKG_DIR/.3Dmol-min.js.tmp" "$PKG_DIR/3Dmol-min.js"
    cp "$NPM_DIR/node_modules/3dmol/LICENSE" "$PKG_DIR/LICENSE"
    cp "$BUILD/3Dmol-min.js.LICENSE.txt" "$PKG_DIR/3Dmol-min.js.LICENSE.txt" 2>/dev/null || true
    echo "$THREEDMOL_VERSION" > "$PKG_DIR/VERSION"
fi
echo "fetch_3dmol: package data $PKG_DIR/3Dmol-min.js ($THREEDMOL_VERSION)"
