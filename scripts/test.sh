#!/usr/bin/env bash
# Runs the whole test suite.
#
# When DATABASE_URL is not given, starts a throwaway PostgreSQL server for the
# Postgres tests (initdb into a temporary directory, as the postgres user when
# run as root), and stops and removes it afterwards. The port is chosen below
# 32768: on a port in the kernel's ephemeral range, a client reconnecting to a
# stopped server can end up connected to itself.
#
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh orders::`).
set -euo pipefail
cd "$(dirname "$0")/.."

find_pg_bin() {
    if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return; fi
    for dir in /usr/lib/postgresql/*/bin /usr/local/pgsql/bin; do
        if [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
    done
    if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
    fi
}

free_port() {
    local port
    for _ in $(seq 1 50); do
        port=$(( 20000 + RANDOM % 12000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"; return
        fi
    done
    return 1
}

pg_dir=""
as_pg=()
stop_pg() {
    if [ -n "$pg_dir" ]; then
        "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$pg_dir/data" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$pg_dir"
    fi
}

if [ -z "${DATABASE_URL:-}" ]; then
    PG_BIN=$(find_pg_bin || true)
    if [ -n "$PG_BIN" ]; then
        pg_dir=$(mktemp -d /tmp/reliability-lab-pg.XXXXXX)
        trap stop_pg EXIT
        if [ "$(id -u)" = 0 ]; then
            chown postgres: "$pg_dir"
            as_pg=(runuser -u postgres --)
        fi
        port=$(free_port)
        "${as_pg[@]}" "$PG_BIN/initdb" -D "$pg_dir/data" -U postgres -A trust --no-sync >"$pg_dir/initdb.log" 2>&1 \
            || { cat "$pg_dir/initdb.log" >&2; exit 1; }
        "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w \
            -o "-p $port -k $pg_dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null \
            || { cat "$pg_dir/server.log" >&2; exit 1; }
        export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
        export PG_BIN
        echo "test.sh: throwaway PostgreSQL ($("$PG_BIN/postgres" --version)) on 127.0.0.1:$port" >&2
    else
        echo "test.sh: !!! no PostgreSQL server binaries found and DATABASE_URL unset:" >&2
        echo "test.sh: !!! the Postgres tests will say so (and fail when CI=true)." >&2
    fi
fi

cargo test --all-targets "$@"
