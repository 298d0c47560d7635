#!/usr/bin/env bash
# Until the A/B study exists (F6): start vgpud, create two vGPUs, run a guest against each.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "study: not yet implemented (F1 in progress)"
