#!/usr/bin/env bash
# Runs the whole test suite.
#
# When DATABASE_URL is not given, starts a throwaway PostgreSQL server for the
# Postgres tests and stops and removes it afterwards (scripts/pg.sh). Without
# server binaries the Postgres tests say so loudly, and fail when CI=true.
#
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test api crash`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh

if [ -z "${DATABASE_URL:-}" ]; then
    if start_throwaway_pg; then
        export DATABASE_URL="$PG_URL"
    else
        echo "test.sh: !!! DATABASE_URL unset and no server could be started:" >&2
        echo "test.sh: !!! the Postgres tests will say so (and fail when CI=true)." >&2
    fi
fi

# Benchmarks are built (and linted) by `make lint`; they run with `make bench`.
cargo test --lib --bins --tests "$@"
