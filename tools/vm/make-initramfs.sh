#!/usr/bin/env bash
# Builds what the F14 VM test boots: Debian 12's kernel (vmlinuz, taken from the
# linux-image package with apt-get download + dpkg -x, never installed on the host) and an
# initramfs (cpio.gz) holding busybox-static and the static guest program, whose /init
# mounts proc, sys and devtmpfs, runs `vgpu-vm-guest --poweroff` and powers the VM off.
#
#   tools/vm/make-initramfs.sh [GUEST_BINARY]      (default: build/tools/vgpu-vm-guest)
#
# Output, in ${VGPUD_VM_CACHE:-$HOME/.cache/vgpud-vm}/guest/: vmlinuz, initramfs.cpio.gz.
# Prints their two paths. Idempotent: the kernel is fetched once, the initramfs is rebuilt
# whenever the guest program is newer than it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GUEST_BIN=${1:-$ROOT/build/tools/vgpu-vm-guest}
OUT=${VGPUD_VM_CACHE:-$HOME/.cache/vgpud-vm}/guest
mkdir -p "$OUT"

die() { echo "make-initramfs: $*" >&2; exit 1; }
[ -x "$GUEST_BIN" ] || die "no guest program at $GUEST_BIN (build it: ninja -C build tools/vgpu-vm-guest)"
if file -L "$GUEST_BIN" 2>/dev/null | grep -q 'dynamically linked'; then
  die "$GUEST_BIN is dynamically linked; the initramfs has no shared libraries"
fi

apt_install() {  # apt_install PACKAGE...: installs what is missing (root only)
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; run: sudo apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}" >&2
}
apt_install busybox-static cpio
BUSYBOX=/bin/busybox
file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not the static busybox"

# --- the kernel: linux-image-amd64's versioned dependency, unpacked, not installed ---
if [ ! -s "$OUT/vmlinuz" ]; then
  pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
  [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 to a versioned kernel package"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # apt-get download writes to the current directory; as root it warns that _apt cannot
  # read it (harmless for a temp dir), so let it be world-readable.
  chmod 755 "$tmp"
  (cd "$tmp" && apt-get download "$pkg" >&2)
  deb=$(ls "$tmp"/*.deb)
  rm -rf "$OUT/kernel"
  dpkg -x "$deb" "$OUT/kernel"
  vmlinuz=$(ls "$OUT"/kernel/boot/vmlinuz-* | head -n1)
  cp "$vmlinuz" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
  echo "$pkg" > "$OUT/kernel-package"
fi

# --- the initramfs ---
if [ ! -s "$OUT/initramfs.cpio.gz" ] || [ "$GUEST_BIN" -nt "$OUT/initramfs.cpio.gz" ] ||
   [ "$0" -nt "$OUT/initramfs.cpio.gz" ]; then
  stage=$(mktemp -d)
  mkdir -p "$stage"/{bin,sbin,proc,sys,dev,tmp,root}
  cp "$BUSYBOX" "$stage/bin/busybox"
  # Debug info is most of the program's size and of no use in the guest.
  strip --strip-debug -o "$stage/bin/vgpu-vm-guest" "$GUEST_BIN" 2>/dev/null || cp "$GUEST_BIN" "$stage/bin/vgpu-vm-guest"
  cat > "$stage/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "VGPU-VM-INIT: kernel $(uname -r), cmdline: $(cat /proc/cmdline)"
for d in /sys/bus/pci/devices/*; do echo "VGPU-VM-INIT: pci ${d##*/} $(cat $d/vendor):$(cat $d/device)"; done
/bin/vgpu-vm-guest --poweroff
# Reached only when the program could not power off.
echo "VGPU-VM-INIT: vgpu-vm-guest exited $?"
poweroff -f
INIT
  chmod 755 "$stage/init"
  (cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet | gzip -9) > "$OUT/initramfs.cpio.gz.tmp"
  mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
  rm -rf "$stage"
fi
echo "$OUT/vmlinuz"
echo "$OUT/initramfs.cpio.gz"
