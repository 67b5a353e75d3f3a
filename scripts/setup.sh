#!/usr/bin/env bash
# One-shot, idempotent setup on Debian/Ubuntu: system packages, then .venv with pinned Python packages.
# Usage: scripts/setup.sh [EXTRAS]   (EXTRAS defaults to "train,agent,export,dev")
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-train,agent,export,web,dev}"
APT_PACKAGES=(dataset-fashion-mnist mosquitto python3-venv chromium)
command -v node >/dev/null && command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)  # the web device (android_demo/)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, by exact pin: an unpinned resolve would pull a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[${EXTRAS}]"
echo "setup: .venv ready (extras: ${EXTRAS})"

# The web device (android_demo/): npm packages from its lock file (again when the lock file changes), then its build.
if [ ! -f android_demo/node_modules/.package-lock.json ] || [ android_demo/package-lock.json -nt android_demo/node_modules/.package-lock.json ]; then
  (cd android_demo && npm ci --no-audit --no-fund --loglevel=error)
fi
(cd android_demo && npm run --silent build)
echo "setup: android_demo built (android_demo/dist)"
