#!/usr/bin/env bash
# Ring attention on this machine: `attend bench --ring` under mpirun with 1 and
# P ranks of one thread each (HL_NUM_THREADS=1), causal and not, contiguous and
# zig-zag, alternating rounds (a noisy neighbour hits every run alike); then
# the efficiency T1 / (P · TP) from the medians of the rounds. Writes one JSON
# line per run to $OUT (default bench/results/ring_scaling.jsonl).
#   bench/ring_scaling.sh [BUILD_DIR] [P] [N] [ROUNDS]
set -euo pipefail
BUILD=${1:-build}
P=${2:-2}
N=${3:-8192}
ROUNDS=${4:-3}
OUT=${OUT:-bench/results/ring_scaling.jsonl}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 HL_NUM_THREADS=1
: > "$OUT"
for round in $(seq "$ROUNDS"); do
    for causal in "" --causal; do
        for ranks in 1 "$P"; do
            for layout in contiguous zigzag; do
                mpirun -np "$ranks" --oversubscribe "$BUILD/bin/attend" bench --ring --layout "$layout" --b 1 --h 8 \
                    --n "$N" --m "$N" --d 64 $causal --repeats 5 --json | tail -1 >> "$OUT"
            done
        done
    done
done
python3 - "$OUT" "$P" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
P = int(sys.argv[2])
def median(key, **match):
    rows = [r for r in runs if all(r[k] == v for k, v in match.items())]
    return statistics.median(r[key] for r in rows), rows
for causal in (False, True):
    for layout in ("contiguous", "zigzag"):
        t1, _ = median("median_ms", ranks=1, causal=causal, layout=layout)
        tp, rows = median("median_ms", ranks=P, causal=causal, layout=layout)
        balance = statistics.median(r["balance"] for r in rows)
        wait = statistics.median(max(r["wait_ms"]) for r in rows)
        sent = rows[0]["bytes_sent"][0] / 2**20
        print(f"causal={causal!s:5} {layout:10}  T1 {t1:8.1f} ms  T{P} {tp:8.1f} ms  efficiency {t1 / (P * tp):.2f}  "
              f"balance {balance:.2f}  most wait {wait:.1f} ms  sent {sent:.1f} MiB/rank")
PY
