#!/usr/bin/env bash
# Time the demo end to end from a clean output directory: wall time and peak RSS (/usr/bin/time -v).
#   bash scripts/benchmark_demo.sh [--quick] [OUT_DIR]
# Budget (issue 6): the full demo in <= 15 minutes, --quick in <= 3 minutes, on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=""
if [[ "${1:-}" == "--quick" ]]; then QUICK="--quick"; shift; fi
OUT="${1:-/tmp/pacx_demo_bench${QUICK:+_quick}}"
PY="${PY:-.venv/bin/python}"
rm -rf "$OUT"
LOG="$OUT.time.log"
/usr/bin/time -v "$PY" -m pacx.demo --out "$OUT" $QUICK --wandb disabled 2> >(tee "$LOG" >&2)
echo "---"
grep -E "Elapsed \(wall clock\)|Maximum resident set size" "$LOG"
"$PY" - "$OUT/demo_summary.json" <<'PYEOF'
import json, sys
nodes = json.load(open(sys.argv[1]))["nodes"]  # plans/demo.yaml nodes (by name)
for name, res in nodes.items():
    print(f"{name:<12} {res['seconds'] or 0:>8.1f} s  ({res['points']} points)")
print(f"{'total':<12} {sum(r['seconds'] or 0 for r in nodes.values()):>8.1f} s")
PYEOF
