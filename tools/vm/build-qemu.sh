#!/usr/bin/env bash
# Builds qemu-system-x86_64 with QEMU's vfio-user client (vfio-user-pci, QEMU >= 10.1)
# into a cache folder outside the repository, for tests/vm.
#
# Debian 12 ships QEMU 7.2, which has no vfio-user client, so the pinned source package
# comes from Debian sid through a PRIVATE apt configuration (own sources list, own lists
# and cache under the cache folder; /etc/apt is never touched). QEMU 10.x needs a newer
# meson than Debian 12's and the +ds tarball lacks QEMU's bundled Python wheels, so
# meson and pycotap come from newer Debian binary packages, unpacked with `dpkg -x` into
# the cache (not installed). Firmware is Debian 12's seabios + qemu-system-data.
#
# Idempotent: each step leaves a stamp; a rerun with the stamps present does nothing.
# First run on the 2-core dev machine (2026-12-02, shared with other builds): apt update 3 s,
# source download 1 s + unpack 6 s, meson/pycotap download 1 s, configure 24 s,
# ninja qemu-system-x86_64 (1642 steps) 2126 s; a cached run takes under a second.
# Layout:  $CACHE/qemu/bin/qemu-system-x86_64   $CACHE/qemu/share/qemu (firmware, -L)
# Env:     VGPUD_VM_CACHE  cache folder (default $HOME/.cache/vgpud-vm)
#          VGPUD_VM_JOBS   build jobs (default 2)
# Prints the binary's path on the last line of stdout. Heavy steps run under `nice`.
# Step durations are appended to $CACHE/timings.
set -euo pipefail

QEMU_VERSION="1:10.2.2+ds-1"           # pinned: reproducible build
QEMU_UPSTREAM="10.2.2"
MIRROR="http://deb.debian.org/debian"
SUITE="sid"
CACHE="${VGPUD_VM_CACHE:-$HOME/.cache/vgpud-vm}"
JOBS="${VGPUD_VM_JOBS:-2}"
PREFIX="$CACHE/qemu"
QEMU_BIN="$PREFIX/bin/qemu-system-x86_64"
FIRMWARE_DIR="$PREFIX/share/qemu"
# System python: configure builds a venv with --system-site-packages (python3-venv).
PYTHON=/usr/bin/python3

log() { echo "build-qemu: $*" >&2; }
stamp() { date -u +%s > "$CACHE/stamps/$1"; }
timed() {  # timed NAME cmd...: runs cmd, records its duration in $CACHE/timings
  local name="$1"; shift
  local t0 t1 rc=0
  t0=$(date +%s)
  "$@" || rc=$?
  t1=$(date +%s)
  echo "$name $((t1 - t0))s (exit $rc)" >> "$CACHE/timings"
  echo "build-qemu: $name took $((t1 - t0))s" >&2
  return $rc
}

mkdir -p "$CACHE/stamps"

# --- 1. Debian 12 build deps + firmware (system apt, idempotent like install-deps.sh) ---
HOST_PACKAGES=(
  ninja-build pkg-config gcc python3-venv dpkg-dev
  libglib2.0-dev libpixman-1-dev flex bison
  seabios qemu-system-data                  # firmware: bios-256k.bin, efi-*.rom, kvmvapic.bin ...
)
missing=()
for p in "${HOST_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -ne 0 ]; then
  log "installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq
  $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}"
fi

# Firmware dir: links to Debian 12's files, as Debian's own QEMU finds them (its firmware
# path is /usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu). $FIRMWARE_DIR is also the
# compiled-in data dir of the QEMU built here, so -L is optional. Redone on every run.
link_firmware() {
  mkdir -p "$FIRMWARE_DIR"
  local d f
  for d in /usr/lib/ipxe/qemu /usr/share/qemu /usr/share/seabios; do  # later dirs win
    [ -d "$d" ] || continue
    for f in "$d"/*; do ln -sfn "$(readlink -f "$f")" "$FIRMWARE_DIR/$(basename "$f")"; done
  done
  [ -e "$FIRMWARE_DIR/bios-256k.bin" ] || { log "no bios-256k.bin (seabios) in $FIRMWARE_DIR"; exit 1; }
}

if [ -x "$QEMU_BIN" ] && [ -f "$CACHE/stamps/install" ] &&
   [ "$(cat "$CACHE/stamps/version" 2>/dev/null)" = "$QEMU_VERSION" ]; then
  link_firmware
  log "cached: $("$QEMU_BIN" --version | head -1); firmware: $FIRMWARE_DIR"
  echo "$QEMU_BIN"
  exit 0
fi

# --- 2. Private apt configuration pointing at sid ---
APTDIR="$CACHE/apt"
mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/empty.d"
touch "$APTDIR/status"
cat > "$APTDIR/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main
SRC
APT_OPTS=(
  -o "Dir::Etc::SourceList=$APTDIR/sources.list"
  -o "Dir::Etc::SourceParts=$APTDIR/empty.d"
  -o "Dir::Etc::Preferences=$APTDIR/empty.pref"
  -o "Dir::Etc::PreferencesParts=$APTDIR/empty.d"
  -o "Dir::State::Lists=$APTDIR/lists"
  -o "Dir::State::status=$APTDIR/status"
  -o "Dir::Cache=$APTDIR/cache"
  -o "Dir::Cache::archives=$APTDIR/cache/archives"
  -o "Acquire::Check-Valid-Until=false"
  -o "Acquire::Languages=none"
  -o "APT::Get::List-Cleanup=false"
  -o "Debug::NoLocking=true"
  -o "APT::Sandbox::User=root"          # the cache is root-owned; _apt cannot write it
)
papt() { apt-get "${APT_OPTS[@]}" "$@"; }

if [ ! -f "$CACHE/stamps/apt-update" ]; then
  log "apt-get update (private lists, $SUITE)"
  timed apt-update papt update -qq
  stamp apt-update
fi

# --- 3. QEMU source package, pinned ---
SRCDIR="$CACHE/src/qemu-$QEMU_UPSTREAM"
if [ ! -f "$CACHE/stamps/source" ]; then
  mkdir -p "$CACHE/src/dl"
  log "apt-get source --download-only qemu=$QEMU_VERSION"
  (cd "$CACHE/src/dl" && timed download-source papt source -qq --download-only "qemu=$QEMU_VERSION")
  rm -rf "$SRCDIR"
  dsc=$(ls "$CACHE"/src/dl/qemu_*.dsc | head -1)
  timed unpack-source dpkg-source --no-check -x "$dsc" "$SRCDIR" >/dev/null
  stamp source
fi

# --- 4. Newer meson + pycotap (+ anything configure's mkvenv demands) from sid binaries ---
PYDEPS="$CACHE/pydeps"
if [ ! -f "$CACHE/stamps/pydeps" ]; then
  rm -rf "$PYDEPS" "$CACHE/debs"; mkdir -p "$PYDEPS" "$CACHE/debs"
  log "apt-get download meson python3-pycotap ($SUITE)"
  (cd "$CACHE/debs" && timed download-pydeps papt download -qq meson python3-pycotap)
  for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$PYDEPS"; done
  stamp pydeps
fi
export PYTHONPATH="$PYDEPS/usr/lib/python3/dist-packages${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PYDEPS/usr/bin:$PATH"


# --- 5. Configure: x86_64 softmmu only; KVM + TCG (+ qtest, always built); no optional
# libraries, UIs, docs or tools. The vfio-user *client* has no configure switch: it is the
# Kconfig device CONFIG_VFIO_USER (hw/vfio-user/Kconfig: default y, depends on VFIO_PCI,
# which is default y on Linux with PCI), so keeping the default x86_64 device set keeps it.
# (--enable-vfio-user-server is the opposite side, QEMU as a server; not wanted.)
BUILDDIR="$CACHE/build"
CONFIGURE_ARGS=(
  --prefix="$PREFIX"
  --python="$PYTHON"
  --target-list=x86_64-softmmu
  --without-default-features
  --enable-system --enable-kvm --enable-tcg --enable-pixman
  --disable-user --disable-tools --disable-guest-agent --disable-docs
  --disable-download --disable-install-blobs --disable-werror
  --disable-debug-info
)
if [ ! -f "$CACHE/stamps/configure" ]; then
  rm -rf "$BUILDDIR"; mkdir -p "$BUILDDIR"
  log "configure ${CONFIGURE_ARGS[*]}"
  (cd "$BUILDDIR" && timed configure nice "$SRCDIR/configure" "${CONFIGURE_ARGS[@]}") \
    > "$CACHE/configure.log" 2>&1 || { tail -40 "$CACHE/configure.log" >&2; exit 1; }
  echo "${CONFIGURE_ARGS[*]}" > "$CACHE/configure-line"
  stamp configure
fi

# --- 6. Build only the emulator ---
if [ ! -f "$CACHE/stamps/build" ]; then
  log "ninja -j$JOBS qemu-system-x86_64 (log: $CACHE/build.log)"
  timed build nice ninja -C "$BUILDDIR" -j"$JOBS" qemu-system-x86_64 \
    > "$CACHE/build.log" 2>&1 || { tail -40 "$CACHE/build.log" >&2; exit 1; }
  stamp build
fi

# --- 7. Install: the binary + the firmware dir (links to Debian 12's seabios/qemu-system-data).
mkdir -p "$PREFIX/bin"
install -m0755 "$BUILDDIR/qemu-system-x86_64" "$QEMU_BIN.new"
mv -f "$QEMU_BIN.new" "$QEMU_BIN"
link_firmware
if ! "$QEMU_BIN" -nodefaults -device help 2>/dev/null | grep -q '"vfio-user-pci"'; then
  log "built QEMU has no vfio-user-pci device"; exit 1
fi
echo "$QEMU_VERSION" > "$CACHE/stamps/version"
stamp install
log "$("$QEMU_BIN" --version | head -1); firmware: $FIRMWARE_DIR"
echo "$QEMU_BIN"
