#!/usr/bin/env bash
# Runs the whole test suite: `cargo test` for the library, the binary and the
# integration tests (benchmarks are built and linted by `make lint` and run
# by `make bench`).
#
# The Postgres tests need a server: DATABASE_URL when it is set, otherwise a
# throwaway cluster the test harness starts itself (tests/api/helpers/
# postgres.rs), so a plain `cargo test` runs them too. Without PostgreSQL's
# server binaries they fail with the reason; SKIP_POSTGRES=1 skips them and
# says how many.
#
# The console's browser tests need Chromium (Debian: apt-get install
# chromium, or CHROMIUM=/path); without it they fail with the reason, and
# SKIP_BROWSER=1 skips them.
#
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test api crash`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --lib --bins --tests "$@"
