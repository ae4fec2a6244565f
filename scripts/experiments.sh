#!/usr/bin/env bash
# make experiments: every experiment in experiments/, one after another, each
# report in reports/<name>/. QUICK=1 runs the quick profiles.
#
# Experiments with replicas need Postgres: DATABASE_URL when it is set,
# otherwise a throwaway server started here (scripts/pg.sh) and removed at
# the end. Without server binaries those experiments are skipped, each with a
# line saying so; the others run in memory either way.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh

cargo build --release --bin reliability-lab
if [ -z "${DATABASE_URL:-}" ]; then
    if start_throwaway_pg; then
        export DATABASE_URL="$PG_URL"
    else
        echo "experiments with replicas will be skipped: no Postgres" >&2
    fi
fi

status=0
for file in experiments/*.toml; do
    target/release/reliability-lab experiment run "$file" ${QUICK:+--quick} || status=1
done
exit $status
