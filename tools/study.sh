#!/usr/bin/env bash
# ./run.sh study: start vgpud, create vGPUs, run guests against them. Until the A/B study
# (F6) lands, it runs the bring-up selftest and one kernel per guest and prints what it did.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
RUNDIR=$(mktemp -d /tmp/vgpud-study.XXXXXX)
A=aaaaaaaa-5757-4000-8000-000000000001
B=bbbbbbbb-5757-4000-8000-000000000002

"$BUILD/tools/vgpud" --runtime-dir "$RUNDIR" --vgpu "$A:small" --vgpu "$B:small" 2>"$RUNDIR/vgpud.log" &
DAEMON=$!
cleanup() { kill "$DAEMON" 2>/dev/null || true; wait "$DAEMON" 2>/dev/null || true; rm -rf "$RUNDIR"; }
trap cleanup EXIT
for u in $A $B; do
  for _ in $(seq 200); do [ -S "$RUNDIR/$u.sock" ] && break; sleep 0.05; done
done
echo "vgpud (pid $DAEMON) serving two vGPUs under $RUNDIR"
rc=0
for u in $A $B; do
  echo "== guest on $u"
  "$BUILD/tools/vgpu-guest" --socket "$RUNDIR/$u.sock" info || rc=1
  "$BUILD/tools/vgpu-guest" --socket "$RUNDIR/$u.sock" selftest >"$RUNDIR/selftest.json" || rc=1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('selftest:', ', '.join(c['check']+('=ok' if c['ok'] else '=FAIL') for c in r))" "$RUNDIR/selftest.json"
done
echo "== daemon log"
cat "$RUNDIR/vgpud.log"
exit $rc
