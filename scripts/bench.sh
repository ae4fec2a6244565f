#!/usr/bin/env bash
# `make bench`: the load benchmark against its references, then the
# micro-benchmarks. Starts a throwaway PostgreSQL for the Postgres figures
# when it can (BENCH_DATABASE_URL to use your own; BENCH_POSTGRES=0 to skip).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh

cargo build --release --bin reliability-lab
if [ "${BENCH_POSTGRES:-1}" != 0 ] && [ -z "${BENCH_DATABASE_URL:-}" ]; then
    if start_throwaway_pg; then
        export BENCH_DATABASE_URL="$PG_URL"
        export PGBENCH="$PG_BIN/pgbench"
    else
        echo "bench.sh: no PostgreSQL: the Postgres figures are skipped" >&2
    fi
fi
cargo bench --bench load -- "$@"
if [ "${BENCH_MICRO:-1}" != 0 ]; then
    cargo bench --bench micro
fi
