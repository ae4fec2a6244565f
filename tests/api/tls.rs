//! Postgres over TLS, against a real server that accepts TLS connections
//! only, with a certificate authority the test makes (helpers/tls.rs): the
//! sslmode and sslrootcert spellings of a managed Postgres's URL, and the
//! startup errors a user sees when a certificate does not verify.

use std::time::Duration;

use reliability_lab::orders::postgres::{Lease, PostgresStore};
use sqlx::Row;

use crate::helpers::{PgCluster, SelfSigned, TestCerts};

/// The store's own connect (what the service does at startup), with a
/// startup timeout long enough that a retried failure would say so.
async fn connect(url: &str) -> Result<PostgresStore, String> {
    PostgresStore::connect(
        url,
        2,
        Duration::from_secs(20),
        Lease::for_new_replica(Duration::from_secs(30)),
    )
    .await
    .map_err(|e| format!("{e:#}"))
}

/// Whether the store's pooled connection runs over TLS, asked of Postgres.
async fn uses_tls(store: &PostgresStore) -> bool {
    sqlx::query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get::<bool, _>("ssl")
}

fn url(host: &str, port: u16, query: &str) -> String {
    format!("postgres://postgres@{host}:{port}/postgres?{query}")
}

#[tokio::test]
async fn sslmode_require_connects_over_tls_and_a_plain_connection_is_refused() {
    let certs = TestCerts::generate();
    let Some(pg) = PgCluster::start_tls(&certs.server_cert, &certs.server_key) else {
        return;
    };
    let store = connect(&url("127.0.0.1", pg.port, "sslmode=require"))
        .await
        .unwrap();
    assert!(uses_tls(&store).await, "sslmode=require must use TLS");
    // The migrations ran over it: the service's tables are there.
    sqlx::query("SELECT count(*) FROM orders")
        .fetch_one(store.pool())
        .await
        .unwrap();
    store.pool().close().await;

    // The server takes TLS only, so the two tests above prove something.
    let err = PostgresStore::connect(
        &url("127.0.0.1", pg.port, "sslmode=disable"),
        1,
        Duration::from_millis(300),
        Lease::for_new_replica(Duration::from_secs(30)),
    )
    .await
    .err()
    .expect("a plain connection is refused");
    assert!(format!("{err:#}").contains("no encryption"), "{err:#}");
}

#[tokio::test]
async fn verify_full_with_the_right_ca_connects_and_checks_the_host_name() {
    let certs = TestCerts::generate();
    let Some(pg) = PgCluster::start_tls(&certs.server_cert, &certs.server_key) else {
        return;
    };
    let ca = certs.ca.display().to_string();

    // The certificate names localhost: verify-full accepts it there.
    let store = connect(&url(
        "localhost",
        pg.port,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    assert!(uses_tls(&store).await);
    store.pool().close().await;

    // The same server by IP address: the certificate does not name it.
    let err = connect(&url(
        "127.0.0.1",
        pg.port,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .err()
    .expect("verify-full checks the host name");
    assert!(
        err.contains("TLS to the database at 127.0.0.1 failed (sslmode=verify-full)"),
        "{err}"
    );
    assert!(
        err.contains("does not name the host \"127.0.0.1\""),
        "{err}"
    );
    assert!(!err.contains("unreachable after"), "not retried: {err}");

    // verify-ca checks the chain and not the name.
    let store = connect(&url(
        "127.0.0.1",
        pg.port,
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    assert!(uses_tls(&store).await);
    store.pool().close().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_at_once_naming_the_cause() {
    let certs = TestCerts::generate();
    let Some(pg) = PgCluster::start_tls(&certs.server_cert, &certs.server_key) else {
        return;
    };
    let wrong = certs.wrong_ca.display().to_string();
    // require with a root file verifies the chain, as libpq does.
    for mode in ["verify-full", "verify-ca", "require"] {
        let err = connect(&url(
            "localhost",
            pg.port,
            &format!("sslmode={mode}&sslrootcert={wrong}"),
        ))
        .await
        .err()
        .unwrap_or_else(|| panic!("sslmode={mode} with the wrong CA must fail"));
        assert!(
            err.contains("the server's certificate was not issued by a CA in sslrootcert"),
            "{mode}: {err}"
        );
        assert!(
            err.contains("unable to get local issuer certificate"),
            "{mode}: the cause itself: {err}"
        );
        assert!(
            !err.contains("unreachable after"),
            "{mode}: not retried: {err}"
        );
    }
    // The public roots do not know the test's CA either.
    let err = connect(&url("localhost", pg.port, "sslrootcert=system"))
        .await
        .err()
        .expect("sslrootcert=system verifies against the public roots");
    assert!(err.contains("sslmode=verify-full"), "{err}");
    assert!(
        err.contains("unable to get local issuer certificate"),
        "{err}"
    );
}

/// The PostgreSQL manual's "Creating Certificates": one self-signed server
/// certificate, given to the client as its own root. `psql` takes it with
/// verify-ca and verify-full; so does the service. Another self-signed
/// certificate is still refused, and under verify-full so is a certificate
/// that names another host.
#[tokio::test]
async fn a_self_signed_server_certificate_given_as_its_root_verifies_as_with_psql() {
    let ours = SelfSigned::make("localhost");
    let Some(pg) = PgCluster::start_tls(&ours.cert, &ours.key) else {
        return;
    };
    let root = ours.cert.display().to_string();
    for mode in ["verify-full", "verify-ca", "require"] {
        let store = connect(&url(
            "localhost",
            pg.port,
            &format!("sslmode={mode}&sslrootcert={root}"),
        ))
        .await
        .unwrap_or_else(|e| panic!("sslmode={mode}: {e}"));
        assert!(uses_tls(&store).await, "{mode}");
        store.pool().close().await;
    }
    // By IP address: verify-ca does not check the name, verify-full does.
    let by_ip = |mode: &str| {
        url(
            "127.0.0.1",
            pg.port,
            &format!("sslmode={mode}&sslrootcert={root}"),
        )
    };
    let store = connect(&by_ip("verify-ca")).await.unwrap();
    store.pool().close().await;
    let err = connect(&by_ip("verify-full"))
        .await
        .err()
        .expect("the name is checked");
    assert!(
        err.contains("does not name the host \"127.0.0.1\""),
        "{err}"
    );

    // Another self-signed certificate (the same command, another key) as
    // the root: refused in every verifying mode.
    let other = SelfSigned::make("localhost");
    let other_root = other.cert.display().to_string();
    for mode in ["verify-full", "verify-ca", "require"] {
        let err = connect(&url(
            "localhost",
            pg.port,
            &format!("sslmode={mode}&sslrootcert={other_root}"),
        ))
        .await
        .err()
        .unwrap_or_else(|| panic!("sslmode={mode} with another certificate must fail"));
        assert!(
            err.contains("was not issued by a CA in sslrootcert"),
            "{mode}: {err}"
        );
        assert!(
            !err.contains("unreachable after"),
            "{mode}: not retried: {err}"
        );
    }
}

/// The manual's certificate made for another host (`/CN=dbhost`): verify-ca
/// takes it at localhost, verify-full does not.
#[tokio::test]
async fn a_self_signed_certificate_for_another_host_passes_verify_ca_and_fails_verify_full() {
    let dbhost = SelfSigned::make("dbhost");
    let Some(pg) = PgCluster::start_tls(&dbhost.cert, &dbhost.key) else {
        return;
    };
    let root = dbhost.cert.display().to_string();
    let store = connect(&url(
        "localhost",
        pg.port,
        &format!("sslmode=verify-ca&sslrootcert={root}"),
    ))
    .await
    .unwrap();
    assert!(uses_tls(&store).await);
    store.pool().close().await;
    let err = connect(&url(
        "localhost",
        pg.port,
        &format!("sslmode=verify-full&sslrootcert={root}"),
    ))
    .await
    .err()
    .expect("verify-full checks the name");
    assert!(
        err.contains("does not name the host \"localhost\""),
        "{err}"
    );
}

#[tokio::test]
async fn the_binary_exits_with_the_cause_when_the_certificate_does_not_verify() {
    let certs = TestCerts::generate();
    let Some(pg) = PgCluster::start_tls(&certs.server_cert, &certs.server_key) else {
        return;
    };
    let database_url = url(
        "localhost",
        pg.port,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            certs.wrong_ca.display()
        ),
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_reliability-lab"))
        .env_clear()
        .env("DATABASE_URL", &database_url)
        .env("DATABASE_STARTUP_TIMEOUT", "30s")
        .env("LOG_FORMAT", "json")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("TLS to the database at localhost failed (sslmode=verify-full): the server's certificate was not issued by a CA in sslrootcert"),
        "{all}"
    );
    assert!(
        !all.contains("database not reachable yet"),
        "not retried: {all}"
    );

    // And a URL that names no root for a verifying mode is refused before
    // any connection, saying what to add.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_reliability-lab"))
        .env_clear()
        .env(
            "DATABASE_URL",
            url("localhost", pg.port, "sslmode=verify-full"),
        )
        .output()
        .await
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("sslmode=verify-full needs sslrootcert"),
        "{all}"
    );
}

#[tokio::test]
async fn sslmode_require_against_a_server_without_tls_fails_at_once_saying_so() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let err = connect(&url("127.0.0.1", pg.port, "sslmode=require"))
        .await
        .err()
        .expect("require needs TLS");
    assert!(
        err.contains("failed (sslmode=require): the server does not offer TLS"),
        "{err}"
    );
    assert!(!err.contains("unreachable after"), "not retried: {err}");
}
