//! PostgreSQL for the tests: a database per test on a shared server, and
//! clusters of a test's own that it can stop and start.
//!
//! The shared server is `DATABASE_URL` when it is set. Otherwise the first
//! test that needs one starts a throwaway cluster (initdb into a temporary
//! directory, as the postgres user when the tests run as root), and the test
//! process stops and removes it when it exits. So a plain `cargo test` runs
//! the Postgres tests too. When no server can be had, a Postgres test fails
//! and says why, unless `SKIP_POSTGRES=1` asks to skip them: then each skip
//! is written straight to the terminal (libtest captures what tests print)
//! and the count is printed again when the test binary exits.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use reliability_lab::orders::postgres::{Lease, PostgresStore, MIGRATOR};
use reliability_lab::orders::OrderRepository;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// Whether the user asked to skip the Postgres tests.
fn skip_requested() -> bool {
    std::env::var("SKIP_POSTGRES").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
}

static SKIPPED: AtomicUsize = AtomicUsize::new(0);

/// What a Postgres test does when it has no server: skip loudly when asked
/// to, fail with the reason otherwise. Returns only when skipping.
fn no_server(reason: &str) {
    if skip_requested() {
        let n = SKIPPED.fetch_add(1, Ordering::SeqCst) + 1;
        at_exit();
        // Straight to the process's stderr: libtest captures `eprintln!`.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED a Postgres test (SKIP_POSTGRES=1; {n} so far): {reason}"
        );
        return;
    }
    panic!(
        "this test needs PostgreSQL and none could be had: {reason}. \
         Install the server binaries (Debian: apt-get install postgresql), or set DATABASE_URL, \
         or set SKIP_POSTGRES=1 to skip the Postgres tests"
    );
}

/// The admin URL of the shared test server, or None when skipping.
pub fn postgres_url() -> Option<String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if !url.is_empty() {
            return Some(url);
        }
    }
    static SHARED: OnceLock<Result<String, String>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let cluster = PgCluster::try_start()?;
        let url = cluster.url();
        *THROWAWAY.lock().unwrap() = Some(cluster);
        at_exit();
        Ok(url)
    });
    match shared {
        Ok(url) => Some(url.clone()),
        Err(reason) => {
            no_server(reason);
            None
        }
    }
}

/// The throwaway shared cluster, stopped when the process exits.
static THROWAWAY: Mutex<Option<PgCluster>> = Mutex::new(None);

/// Registers, once, what runs when the test binary exits: stopping the
/// shared cluster and saying how many tests were skipped. Statics are never
/// dropped, so this is the only place both can happen.
fn at_exit() {
    extern "C" fn on_exit() {
        if let Ok(mut cluster) = THROWAWAY.lock() {
            cluster.take();
        }
        let skipped = SKIPPED.load(Ordering::SeqCst);
        if skipped > 0 {
            let _ = writeln!(
                std::io::stderr(),
                "\nSKIPPED: {skipped} Postgres tests did not run (SKIP_POSTGRES=1)\n"
            );
        }
    }
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        // SAFETY: registers a plain function with no captured state.
        let rc = unsafe { libc::atexit(on_exit) };
        assert_eq!(rc, 0, "atexit registration failed");
    });
}

/// Replaces the database name in a Postgres URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (prefix, _) = base.rsplit_once('/').expect("URL has a path");
    let mut out = format!("{prefix}/{name}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A fresh database for one test, migrated.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    admin_url: String,
    name: String,
}

impl TestDb {
    /// None only when skipping (SKIP_POSTGRES=1); without a server it fails.
    pub async fn create() -> Option<Self> {
        let admin_url = postgres_url()?;
        let name = format!("rlab_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test server");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        let options: PgConnectOptions = url.parse().unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.disable_statement_logging())
            .await
            .expect("connect to the test database");
        MIGRATOR.run(&pool).await.expect("migrations apply");
        Some(Self {
            url,
            pool,
            admin_url,
            name,
        })
    }

    /// A store acting as one replica with a fresh id.
    pub fn store(&self) -> Arc<dyn OrderRepository> {
        Arc::new(self.replica(Duration::from_secs(30)))
    }

    pub fn replica(&self, lease: Duration) -> PostgresStore {
        PostgresStore::from_pool(self.pool.clone(), Lease::for_new_replica(lease))
    }

    /// Drops the database (a failed test leaves it for inspection).
    pub async fn destroy(self) {
        self.pool.close().await;
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

/// The PostgreSQL server binaries, if this machine has them.
pub fn pg_bin() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

/// Whether this process runs as root (then servers run as `postgres`).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A PostgreSQL server that a test can stop and start (to watch the service
/// lose and regain its database). Runs as the postgres user when the test
/// runs as root, on a port below 32768 (see scripts/pg.sh for why).
pub struct PgCluster {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
    /// Serves TLS only (ssl=on, every TCP connection must use it).
    tls: bool,
}

impl PgCluster {
    /// A running cluster; None only when skipping (SKIP_POSTGRES=1).
    pub fn start() -> Option<Self> {
        match Self::try_start() {
            Ok(cluster) => Some(cluster),
            Err(reason) => {
                no_server(&reason);
                None
            }
        }
    }

    /// A running cluster, or why there can be none.
    pub fn try_start() -> Result<Self, String> {
        Self::try_start_with(None)
    }

    /// A running cluster that speaks TLS only, with this certificate and
    /// key: pg_hba.conf's TCP lines become `hostssl`, so a connection
    /// without TLS is refused.
    pub fn start_tls(cert: &Path, key: &Path) -> Option<Self> {
        match Self::try_start_with(Some((cert, key))) {
            Ok(cluster) => Some(cluster),
            Err(reason) => {
                no_server(&reason);
                None
            }
        }
    }

    fn try_start_with(tls: Option<(&Path, &Path)>) -> Result<Self, String> {
        let bin = pg_bin().ok_or_else(|| {
            "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and $PG_BIN)"
                .to_owned()
        })?;
        let dir = std::env::temp_dir().join(format!("rlab-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown").arg("postgres:").arg(&dir))?;
        }
        let cluster = Self {
            bin,
            dir,
            port: free_port_below_32768(),
            as_postgres,
            tls: tls.is_some(),
        };
        cluster.pg(&[
            "initdb",
            "-D",
            "data",
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        ])?;
        if let Some((cert, key)) = tls {
            let data = cluster.dir.join("data");
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, data.join(to)).map_err(|e| format!("copy {from:?}: {e}"))?;
            }
            // Postgres refuses a key others can read.
            run(Command::new("chmod")
                .arg("600")
                .arg(data.join("server.key")))?;
            if as_postgres {
                run(Command::new("chown")
                    .arg("postgres:")
                    .arg(data.join("server.crt"))
                    .arg(data.join("server.key")))?;
            }
            let hba = data.join("pg_hba.conf");
            let text = std::fs::read_to_string(&hba).map_err(|e| e.to_string())?;
            let text: String = text
                .lines()
                .map(|l| match l.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            std::fs::write(&hba, text).map_err(|e| e.to_string())?;
        }
        cluster.try_up()?;
        Ok(cluster)
    }

    /// A command running one of the server's programs, as the postgres user
    /// when we are root, in the cluster's directory.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.current_dir(&self.dir);
        cmd
    }

    fn pg(&self, args: &[&str]) -> Result<(), String> {
        run(self.command(args[0]).args(&args[1..]))
    }

    fn try_up(&self) -> Result<(), String> {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        if self.tls {
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        self.pg(&[
            "pg_ctl",
            "-D",
            "data",
            "-l",
            "server.log",
            "-w",
            "-o",
            &opts,
            "start",
        ])
        .map_err(|e| format!("{e}\nserver log:\n{}", self.log()))
    }

    pub fn up(&self) {
        self.try_up().unwrap();
    }

    pub fn down(&self) {
        self.pg(&["pg_ctl", "-D", "data", "-m", "fast", "-w", "stop"])
            .unwrap();
    }

    /// Stops the server the way a crash does (`-m immediate`: no
    /// checkpoint, every backend killed; the next start replays the WAL).
    pub fn crash(&self) {
        self.pg(&["pg_ctl", "-D", "data", "-m", "immediate", "-w", "stop"])
            .unwrap();
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", "data", "-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a command, returning its output as the error when it fails.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{cmd:?} did not start: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A loopback port below the kernel's ephemeral range that nothing listens on.
pub fn free_port_below_32768() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}
