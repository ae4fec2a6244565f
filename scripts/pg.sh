# Sourced by bench.sh: a throwaway PostgreSQL server. (The test suite starts
# its own, in tests/api/helpers/postgres.rs.)
#
# start_throwaway_pg starts one (initdb into a temporary directory, run as the
# postgres user when we are root) and sets PG_URL and PG_BIN; it arranges for
# the server to be stopped and removed when the calling script exits. It
# returns non-zero, saying why, when no server binaries can be found.
#
# The port is chosen below 32768: on a port in the kernel's ephemeral range, a
# client reconnecting to a stopped server can end up connected to itself.

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

_pg_dir=""
_as_pg=()
stop_throwaway_pg() {
    if [ -n "$_pg_dir" ]; then
        "${_as_pg[@]}" "$PG_BIN/pg_ctl" -D "$_pg_dir/data" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$_pg_dir"
        _pg_dir=""
    fi
}

start_throwaway_pg() {
    PG_BIN=$(find_pg_bin || true)
    if [ -z "$PG_BIN" ]; then
        echo "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin)" >&2
        return 1
    fi
    _pg_dir=$(mktemp -d /tmp/reliability-lab-pg.XXXXXX)
    trap stop_throwaway_pg EXIT
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$_pg_dir"
        _as_pg=(runuser -u postgres --)
    fi
    local port
    port=$(free_port)
    "${_as_pg[@]}" "$PG_BIN/initdb" -D "$_pg_dir/data" -U postgres -A trust --no-sync >"$_pg_dir/initdb.log" 2>&1 \
        || { cat "$_pg_dir/initdb.log" >&2; return 1; }
    "${_as_pg[@]}" "$PG_BIN/pg_ctl" -D "$_pg_dir/data" -l "$_pg_dir/server.log" -w \
        -o "-p $port -k $_pg_dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null \
        || { cat "$_pg_dir/server.log" >&2; return 1; }
    PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
    export PG_BIN
    echo "throwaway PostgreSQL ($("$PG_BIN/postgres" --version)) on 127.0.0.1:$port" >&2
}
