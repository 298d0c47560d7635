#!/usr/bin/env bash
# F14: a real Linux VM runs work on its vGPU. Starts vgpud with one vGPU, takes QEMU's
# vfio-user arguments verbatim from `vgpuctl qemu-args`, boots Debian 12's kernel with the
# initramfs of tools/vm/make-initramfs.sh (busybox + the static vgpu-vm-guest) and passes when
# the serial console shows "VGPU-VM-GUEST: N passed, 0 failed" with N = every catalogue
# kernel + FILL/COPY/FENCE (run with GTT updates in the ring, as a VM's driver should) + one
# churn check per GTT mode, which holds the VM's trapped register accesses per 64 KiB
# create/fill/destroy to at most 3 in ring and batch mode (`vgpu-vm-guest --count`).
#
#   vm_guest_test.sh VGPUD VGPUCTL VGPU_VM_GUEST MAKE_INITRAMFS
#
# QEMU (>= 10.1, with vfio-user-pci) comes from VGPUD_QEMU (the binary) and
# VGPUD_QEMU_FIRMWARE (its -L directory, optional); without VGPUD_QEMU the test is skipped
# (exit 77). VGPUD_VM_ACCEL=kvm|tcg forces the accelerator; otherwise KVM when /dev/kvm
# opens and works, else TCG. VGPUD_VM_LOG keeps the console log at that path.
set -uo pipefail
VGPUD=$1 VGPUCTL=$2 GUEST=$3 MAKE_INITRAMFS=$4

if [ -z "${VGPUD_QEMU:-}" ]; then
  echo "SKIP: VGPUD_QEMU is not set (a QEMU >= 10.1 with vfio-user-pci; tools/vm/build-qemu.sh builds one)"
  exit 77
fi
[ -x "$VGPUD_QEMU" ] || { echo "FAIL: VGPUD_QEMU=$VGPUD_QEMU is not executable"; exit 1; }
QEMU=("$VGPUD_QEMU")
[ -n "${VGPUD_QEMU_FIRMWARE:-}" ] && QEMU+=(-L "$VGPUD_QEMU_FIRMWARE")
if ! "${QEMU[@]}" -device help 2>/dev/null | grep -q '"vfio-user-pci"'; then
  echo "SKIP: $VGPUD_QEMU has no vfio-user-pci device (QEMU >= 10.1 needed)"
  exit 77
fi

TMP=$(mktemp -d /tmp/vgpu-vm-test-XXXXXX)
VGPUD_PID=
cleanup() {
  [ -n "$VGPUD_PID" ] && kill "$VGPUD_PID" 2>/dev/null && wait "$VGPUD_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
t0=$(date +%s)

# --- kernel + initramfs ---
mapfile -t boot < <("$MAKE_INITRAMFS" "$GUEST")
[ ${#boot[@]} -eq 2 ] && [ -s "${boot[0]}" ] && [ -s "${boot[1]}" ] || { echo "FAIL: make-initramfs.sh"; exit 1; }
KERNEL=${boot[0]} INITRD=${boot[1]}
t1=$(date +%s)
echo "kernel $KERNEL, initramfs $INITRD ($((t1 - t0)) s)"

# --- the daemon and one vGPU ---
UUID=5f14a11e-0000-4000-8000-00000000f14a
export VGPUD_CONTROL=$TMP/control.sock
"$VGPUD" --runtime-dir "$TMP" --vgpu "$UUID:small" > "$TMP/vgpud.log" 2>&1 &
VGPUD_PID=$!
ARGS=
for _ in $(seq 1 300); do
  ARGS=$("$VGPUCTL" qemu-args "$UUID" --memory 512M 2>/dev/null) && break
  kill -0 "$VGPUD_PID" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$ARGS" ]; then
  echo "FAIL: vgpud did not start the vGPU"; cat "$TMP/vgpud.log"; exit 1
fi
echo "qemu-args: $ARGS"

# --- the accelerator ---
# "KVM works" means this kernel boots under it: a VM without an initramfs must reach its
# "no root" panic (panic=-1 + -no-reboot: QEMU exits 0) in a few seconds. /dev/kvm can open
# and still fail later (nested hosts: an MSR QEMU cannot set aborts it, or the vCPU hangs).
ACCEL=${VGPUD_VM_ACCEL:-}
if [ -z "$ACCEL" ]; then
  ACCEL=tcg
  if [ -r /dev/kvm ] && [ -w /dev/kvm ] &&
     (timeout 30 "${QEMU[@]}" -accel kvm -cpu max -smp 1 -m 256M -kernel "$KERNEL" \
       -append 'console=ttyS0 panic=-1 no_timer_check loglevel=4' -nodefaults -nographic -serial stdio \
       -no-reboot < /dev/null > "$TMP/kvm-probe.log" 2>&1) 2>/dev/null &&
     grep -q 'Unable to mount root' "$TMP/kvm-probe.log"; then
    ACCEL=kvm
  fi
fi
echo "accelerator: $ACCEL ($(($(date +%s) - t1)) s to decide)"

# --- boot ---
# The RAM window the guest program hands to the device: 64 MiB at 256 MiB, inside the
# 512 MiB of guest RAM, kept from the kernel by memmap= ('$' reaches the kernel as is).
# no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can miss its
# ticks and panic ("IO-APIC + timer doesn't work!").
CONSOLE=$TMP/console.log
eval "set -- $ARGS"
t_boot=$(date +%s)
timeout 900 "${QEMU[@]}" -accel "$ACCEL" -cpu max -smp 1 "$@" \
  -kernel "$KERNEL" -initrd "$INITRD" \
  -append 'console=ttyS0 memmap=64M$0x10000000 panic=-1 no_timer_check quiet loglevel=4' \
  -nodefaults -nographic -serial stdio -no-reboot < /dev/null > "$CONSOLE" 2>&1
qrc=$?
t2=$(date +%s)
[ -n "${VGPUD_VM_LOG:-}" ] && cp "$CONSOLE" "$VGPUD_VM_LOG"
echo "--- console (QEMU exit $qrc, boot + run $((t2 - t_boot)) s) ---"
cat "$CONSOLE"
echo "--- end of console ---"

echo "--- vgpud log (tail) ---"; tail -n 60 "$TMP/vgpud.log"

WANT=$("$GUEST" --count)
grep "^VGPU-VM-GUEST: churn" "$CONSOLE"
if grep -q "^VGPU-VM-GUEST: GTT updates: ring" "$CONSOLE" &&
   grep -q "^VGPU-VM-GUEST: $WANT passed, 0 failed" "$CONSOLE" && [ "$qrc" -eq 0 ]; then
  echo "PASS: $WANT checks passed in the VM ($ACCEL)"
  exit 0
fi
echo "FAIL: no 'VGPU-VM-GUEST: $WANT passed, 0 failed' line, or GTT updates not in the ring (QEMU exit $qrc)"
exit 1
