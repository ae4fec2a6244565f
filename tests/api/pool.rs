//! The service's connection pool on a real Postgres: a connection that sat
//! idle is pinged before use, one in steady use is not.
//!
//! The threshold is a parameter of `pool_options` so that these tests need
//! not wait out the service's one second: zero pings every time, an hour
//! never within a test.

use std::time::Duration;

use reliability_lab::orders::postgres::pool_options;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;

use crate::helpers::TestDb;

const APP: &str = "pool-under-test";

async fn pool(db: &TestDb, ping_if_idle_for: Duration) -> PgPool {
    let options: PgConnectOptions = db.url.parse().unwrap();
    let pool = pool_options(2, ping_if_idle_for).connect_lazy_with(options.application_name(APP));
    // One connection, open and back in the pool.
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    // sqlx hands a connection back in a task of its own, with a ping:
    // wait until it is idle, or the ending below could meet that ping and
    // the pool would drop the connection before the test's statement.
    while pool.num_idle() != 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pool
}

/// Ends the pool's connections from the server's side, as a restart
/// would, and waits until they are gone.
async fn end_server_side(db: &TestDb) {
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(APP)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(!ended.is_empty(), "the pool had a connection to end");
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
          WHERE application_name = $1 AND datname = current_database()",
        )
        .bind(APP)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_idle_connection_the_server_ended_is_replaced_before_the_caller_sees_it() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let pool = pool(&db, Duration::ZERO).await;
    end_server_side(&db).await;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .expect("the ping found the dead connection and a new one answered");
    assert_eq!(one, 1);
    pool.close().await;
    db.destroy().await;
}

#[tokio::test]
async fn a_connection_used_within_the_threshold_goes_out_without_a_ping() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let pool = pool(&db, Duration::from_secs(3600)).await;
    end_server_side(&db).await;
    // No ping: the statement itself meets the ended connection. This is
    // the price of saving a round trip per statement, paid only by a
    // connection the server ended less than the threshold ago.
    let first = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&pool)
        .await;
    assert!(first.is_err(), "{first:?}");
    // The broken connection is not handed out again.
    let again: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(again, 1);
    pool.close().await;
    db.destroy().await;
}
