#!/usr/bin/env bash
# ./run.sh study: the A/B study. vgpu-bench starts its own vgpud, creates the vGPUs it
# needs, runs every workload on the native, mediated and remoting paths side by side, and
# writes the table, JSON, CSV and plots under study-out/ (docs/ab-methodology.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
args=("$@")
if [ ${#args[@]} -eq 0 ]; then args=(--quick); fi
exec "$BUILD/tools/vgpu-bench" --out study-out "${args[@]}"
