#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh test    install what is missing, build (normal + ASan/UBSan), run the whole suite
#   ./run.sh study   install what is missing, build, start vgpud, create vGPUs, run the study
#   ./run.sh vm      build QEMU >= 10.1 (tools/vm/build-qemu.sh, cached outside the repo), build,
#                    run the 'vm' suite: a real QEMU's vfio-user-pci attached to vgpud (F14),
#                    then vgpu-bench's empty/small rows on mediated, mediated-mmio, mediated-qemu
# Extra: ./run.sh build | ./run.sh fuzz [seconds] | ./run.sh soak [seconds]
#   soak: the full resource-hygiene test (1,000 connect/work/disconnect cycles, 1,000 guest
#   kills) and the soak (SOAK_SECONDS, default 600: random workloads and random faults,
#   kill -9 of vgpud included), each printing its figures (docs/isolation.md, "Soak")
# `./run.sh test` (and CI) leave the 'vm' suite out: it needs that QEMU.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
JOBS=${JOBS:-$(nproc)}

setup() {  # setup DIR [meson options...]
  local dir=$1; shift
  if [ ! -f "$dir/build.ninja" ]; then
    meson setup "$dir" "$@" >/dev/null
  elif [ $# -gt 0 ]; then
    meson configure "$dir" "$@" >/dev/null  # an older checkout's build dir: same options as a fresh one
  fi
  ninja -C "$dir" -j "$JOBS"
}

# The main build is what a packager builds (release: -O3, NDEBUG, warnings still errors);
# the suite and the study run on it. Assertions live on in the ASan+UBSan debug build.
build_main() { setup build -Dbuildtype=release; }
build_sanitize() { setup build-san -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug; }
# Only the libFuzzer targets are built with clang: the rest of the tree is gcc's.
build_fuzz() {
  if [ ! -f build-fuzz/build.ninja ]; then
    CXX=clang++ CC=clang meson setup build-fuzz -Dfuzz=true -Db_lundef=false -Dbuildtype=debugoptimized >/dev/null
  fi
  ninja -C build-fuzz build.ninja >/dev/null  # regenerate first: the target list may have grown
  local targets
  targets=$(ninja -C build-fuzz -t targets all | sed -n 's|^\(tests/fuzz/fuzz_[a-z_]*\): .*|\1|p' | sort -u)
  ninja -C build-fuzz -j "$JOBS" $targets
}

# Tallies meson's JSON test log into the closing "N passed, N failed" line.
summarize() {
  python3 - "$@" <<'PY'
import json, sys
passed = failed = skipped = 0
for path in sys.argv[1:]:
    try:
        for line in open(path):
            r = json.loads(line).get("result")
            if r in ("OK", "EXPECTEDFAIL"): passed += 1
            elif r == "SKIP": skipped += 1
            else: failed += 1
    except FileNotFoundError:
        pass
print(f"{passed} passed, {failed} failed, {skipped} skipped")
PY
}

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$ROOT/tests/lsan.supp:print_suppressions=0}

cmd=${1:-test}
case "$cmd" in
  deps) tools/install-deps.sh ;;
  build) tools/install-deps.sh; build_main ;;
  test)
    tools/install-deps.sh
    build_main
    build_sanitize
    rc=0
    meson test -C build --print-errorlogs --num-processes "$JOBS" --no-suite vm || rc=1
    VG_SLOW_FACTOR=3 meson test -C build-san --print-errorlogs --num-processes "$JOBS" --no-suite bench --no-suite vm --no-suite sched-timing || rc=1
    if [ -f tests/fuzz/meson.build ]; then
      build_fuzz
      meson test -C build-fuzz --no-rebuild --print-errorlogs --suite fuzz || rc=1
    fi
    logs=(build/meson-logs/testlog.json build-san/meson-logs/testlog.json)
    [ -f tests/fuzz/meson.build ] && logs+=(build-fuzz/meson-logs/testlog.json)
    summarize "${logs[@]}"
    exit $rc
    ;;
  study)
    tools/install-deps.sh
    build_main
    exec tools/study.sh "${@:2}"
    ;;
  vm)
    tools/install-deps.sh
    qemu=$(VGPUD_VM_JOBS=${VGPUD_VM_JOBS:-$JOBS} tools/vm/build-qemu.sh | tail -n 1)
    build_main
    export VGPUD_QEMU=$qemu
    export VGPUD_QEMU_FIRMWARE=${VGPUD_QEMU_FIRMWARE:-$(dirname "$(dirname "$qemu")")/share/qemu}
    rc=0
    meson test -C build --suite vm --print-errorlogs "${@:2}" || rc=1
    summarize build/meson-logs/testlog.json
    # F12's "posted MMIO doorbell" through this QEMU, beside the in-process client's two
    # doorbells (docs/ab-methodology.md: read mediated-qemu against the qtest floor).
    echo "== vgpu-bench: mediated (ioeventfd), mediated-mmio and mediated-qemu"
    build/tools/vgpu-bench --smoke --groups empty,small --paths native,mediated,mediated-mmio,mediated-qemu \
      --out build/vm-bench || rc=1
    exit $rc
    ;;
  fuzz)
    tools/install-deps.sh
    build_fuzz
    secs=${2:-300}
    for f in build-fuzz/tests/fuzz/fuzz_*; do
      [ -x "$f" ] || continue
      echo "== $f for ${secs}s"
      "$f" -max_total_time="$secs" -rss_limit_mb=4096 "tests/fuzz/corpus/$(basename "$f")" || exit 1
    done
    ;;
  soak)
    tools/install-deps.sh
    build_main
    export VGPUD=$ROOT/build/tools/vgpud VGPU_GUEST=$ROOT/build/tools/vgpu-guest
    rc=0
    echo "== resource hygiene: ${LIFECYCLE_CYCLES:-1000} cycles and guest kills"
    LIFECYCLE_CYCLES=${LIFECYCLE_CYCLES:-1000} build/tests/lifecycle_restart/lifecycle_hygiene || rc=1
    secs=${2:-${SOAK_SECONDS:-600}}
    echo "== soak: ${secs} s, ${SOAK_GUESTS:-3} guests"
    SOAK_SECONDS=$secs build/tests/lifecycle_restart/lifecycle_soak || rc=1
    exit $rc
    ;;
  *) echo "usage: $0 test|study|vm|build|fuzz [seconds]|soak [seconds]" >&2; exit 2 ;;
esac
