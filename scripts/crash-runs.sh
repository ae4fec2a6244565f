#!/usr/bin/env bash
# Repeats the database-crash run (Postgres stopped with -m immediate under
# traffic, started again 5 s later) RUNS times, 10 unless given, and prints
# each run's figures. It stops at the first run that leaves an order
# unfinished or charges one twice (the test fails then, saying which).
#
#   scripts/crash-runs.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
test=crash::a_database_crash_under_traffic_leaves_no_order_unfinished_and_none_charged_twice
cargo test --test api --no-run --quiet
for i in $(seq 1 "$runs"); do
    line=$(cargo test --quiet --test api "$test" -- --exact --nocapture 2>&1 | grep -v '^{' \
        | tee /tmp/crash-run.log | grep '^database crash:' || true)
    if ! grep -q 'test result: ok. 1 passed' /tmp/crash-run.log; then
        echo "run $i of $runs failed:" >&2
        cat /tmp/crash-run.log >&2
        exit 1
    fi
    echo "run $i: ${line#database crash: }"
done
echo "$runs runs: every accepted order finished, none charged twice"
