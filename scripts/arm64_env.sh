#!/usr/bin/env bash
# Emulated aarch64 Python for ARM64 parity checks (export/arm64_check.py) and emulated Raspberry Pi agents in
# a field trial (`nmoe trial --arm64-devices N`), built once and cached:
#   qemu-user-static (Debian), then under ${NMOE_ARM64_CACHE:-$HOME/.cache/nmoe-edge/arm64}:
#   sysroot/        Debian arm64 python3.11 and the shared libraries it and the wheels link, + a fake ARM
#                   /proc/cpuinfo (onnxruntime and ai-edge-litert segfault on import under qemu without it)
#   site-packages/  aarch64 wheels of numpy, onnxruntime, onnx (a device rebuilding its bundle needs it),
#                   ai-edge-litert and paho-mqtt (the agent's MQTT client) at the constraints.txt pins
# Each part has a stamp holding a hash of what it was built from: a changed pin rebuilds it; a cached run
# downloads nothing. Run:  qemu-aarch64-static -L CACHE/sysroot CACHE/sysroot/usr/bin/python3.11
# with PYTHONPATH=CACHE/site-packages:REPO (the project's own code is pure Python). Prints the cache path last.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
CACHE="${NMOE_ARM64_CACHE:-$HOME/.cache/nmoe-edge/arm64}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

# python3.11's own packages, the libraries their Depends name (libnsl2/libtirpc3, only for the `nis`
# module, left out with their Kerberos chain), and libstdc++6 for the onnxruntime and LiteRT wheels.
DEBS=(python3.11 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
      libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libcrypt1 libdb5.3
      libncursesw6 libtinfo6 libreadline8 libsqlite3-0 libuuid1)
CPUINFO='processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3
'
# Every manylinux tag the sysroot's glibc (bookworm: 2.36) runs: pip does not expand a given --platform to
# older glibcs, and ai-edge-litert 2.x ships only manylinux_2_27 wheels.
PLATFORM=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --platform manylinux2014_aarch64)
for glibc in $(seq 17 36); do PLATFORM+=(--platform "manylinux_2_${glibc}_aarch64"); done

pin() {  # pin NAME_REGEX [DEFAULT]: the version constraints.txt pins (PEP 503: -, _ and . are equal)
  local version
  version="$(grep -iE "^$1==" constraints.txt | head -n1 | cut -d= -f3 || true)"
  version="${version:-${2:-}}"
  [ -n "$version" ] || { echo "arm64-env: error: constraints.txt pins no $1" >&2; exit 2; }
  echo "$version"
}
NUMPY="$(pin numpy)"; ONNXRUNTIME="$(pin onnxruntime)"; ONNX="$(pin onnx)"; PAHO="$(pin 'paho[-_.]mqtt')"
LITERT="$(pin 'ai[-_.]edge[-_.]litert' 2.2.0)"
WHEELS=("numpy==$NUMPY" "onnxruntime==$ONNXRUNTIME" "onnx==$ONNX" "ai-edge-litert==$LITERT" "paho-mqtt==$PAHO")
hash_of() { printf '%s\n' "$@" | sha256sum | cut -c1-64; }
SYSROOT_KEY="$(hash_of "${DEBS[@]}" "$CPUINFO")"
SITE_KEY="$(hash_of "${WHEELS[@]}" "${PLATFORM[@]}")"
fresh() { [ -d "$CACHE/$1" ] && [ "$(cat "$CACHE/$1.stamp" 2>/dev/null)" = "$2" ]; }

if ! dpkg-query -W -f='${Status}' qemu-user-static 2>/dev/null | grep -q "install ok installed"; then
  echo "arm64-env: installing Debian package qemu-user-static"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-user-static
fi

build_sysroot() {
  local tmp="$CACHE/sysroot.tmp" debs
  dpkg --print-foreign-architectures | grep -qx arm64 || {
    echo "arm64-env: dpkg --add-architecture arm64"; $SUDO dpkg --add-architecture arm64; }
  echo "arm64-env: apt-get update (arm64 package lists)"
  $SUDO apt-get update -qq
  debs="$(mktemp -d)"
  echo "arm64-env: downloading ${#DEBS[@]} arm64 .debs: ${DEBS[*]}"
  # as root, apt's _apt sandbox user could not write the private temp dir: download as root instead
  local as_root=(); [ -n "$SUDO" ] || as_root=(-o APT::Sandbox::User=root)
  (cd "$debs" && apt-get download -qq "${as_root[@]}" "${DEBS[@]/%/:arm64}")
  rm -rf "$tmp" && mkdir -p "$tmp/proc"
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$tmp"; done
  rm -rf "$debs"
  printf '%s' "$CPUINFO" > "$tmp/proc/cpuinfo"
  rm -rf "$CACHE/sysroot" && mv "$tmp" "$CACHE/sysroot"
  echo "$SYSROOT_KEY" > "$CACHE/sysroot.stamp"
  echo "arm64-env: sysroot ready ($(du -sh "$CACHE/sysroot" | cut -f1))"
}

build_site_packages() {
  local tmp="$CACHE/site-packages.tmp" python="$ROOT/.venv/bin/python"
  [ -x "$python" ] || python="${PYTHON:-python3}"
  echo "arm64-env: pip install --target (aarch64 wheels): ${WHEELS[*]}"
  rm -rf "$tmp"
  "$python" -m pip install -q --disable-pip-version-check --target "$tmp" "${PLATFORM[@]}" \
    -c constraints.txt "${WHEELS[@]}"
  rm -rf "$CACHE/site-packages" && mv "$tmp" "$CACHE/site-packages"
  echo "$SITE_KEY" > "$CACHE/site-packages.stamp"
  echo "arm64-env: site-packages ready ($(du -sh "$CACHE/site-packages" | cut -f1))"
}

mkdir -p "$CACHE"
built=0
if fresh sysroot "$SYSROOT_KEY"; then echo "arm64-env: sysroot cached"; else build_sysroot; built=1; fi
if fresh site-packages "$SITE_KEY"; then
  echo "arm64-env: site-packages cached (${WHEELS[*]})"
else
  build_site_packages; built=1
fi
if ((built)); then
  echo "arm64-env: smoke test under $(qemu-aarch64-static --version | head -n1)"
  QEMU_CPU=cortex-a72 PYTHONNOUSERSITE=1 PYTHONPATH="$CACHE/site-packages" \
    qemu-aarch64-static -L "$CACHE/sysroot" "$CACHE/sysroot/usr/bin/python3.11" -c \
    'import platform, numpy, onnx, onnxruntime, ai_edge_litert.interpreter, paho.mqtt
print("arm64-env:", platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__,
      "onnxruntime", onnxruntime.__version__, "onnx", onnx.__version__, "paho-mqtt", paho.mqtt.__version__,
      "ai-edge-litert interpreter OK")'
fi
echo "$CACHE"
