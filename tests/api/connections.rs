//! Connection timeouts on the real binary, over real sockets: clients that
//! send half their headers, a body that stops, a chunked body that stops, or
//! nothing at all are closed, so they can neither exhaust the file
//! descriptors nor hold up a stop. Timeouts are set to a second or two; the
//! bounds the tests wait for are generous, and each stands for "never"
//! without the timeouts.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{spawn_binary, spawn_binary_limited, Running};

/// A connection that sent `bytes` and then nothing more.
async fn stalled(service: &Running, bytes: &[u8]) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(service.addr).await.ok()?;
    stream.write_all(bytes).await.ok()?;
    Some(stream)
}

const PARTIAL_HEADERS: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: lab\r\nX-Slow: ";
const PARTIAL_BODY: &[u8] = b"POST /orders HTTP/1.1\r\nHost: lab\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"customer_id\":";
const STOPPED_CHUNKS: &[u8] = b"POST /orders HTTP/1.1\r\nHost: lab\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"cus\r\n";

/// Reads until the server closes the connection; the bytes it sent.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, stream.read_to_end(&mut got)).await;
    match read {
        Ok(Ok(_)) | Ok(Err(_)) => Some(got),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_hundred_and_fifty_stalled_connections_do_not_stop_a_fresh_request() {
    let service = spawn_binary_limited(
        &[
            ("HTTP_HEADER_READ_TIMEOUT", "1s"),
            ("HTTP_BODY_TIMEOUT", "1s"),
            ("HTTP_IDLE_TIMEOUT", "1s"),
        ],
        Some(128),
    )
    .await;
    let mut held = Vec::new();
    for i in 0..150 {
        let bytes: &[u8] = match i % 4 {
            0 => b"",
            1 => PARTIAL_HEADERS,
            2 => PARTIAL_BODY,
            _ => STOPPED_CHUNKS,
        };
        if let Some(stream) = stalled(&service, bytes).await {
            held.push(stream);
        }
    }
    // Well over a hundred of them hold a descriptor each: without timeouts
    // the service could accept nothing more, ever.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut answered = false;
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = client.get(service.url("/healthz")).send().await {
            if r.status() == 200 {
                answered = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(answered, "a fresh /healthz was never answered");
    // And the stalled ones were closed by the service.
    let mut closed = 0;
    for stream in held.iter_mut().take(20) {
        if until_closed(stream, Duration::from_secs(10))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 20, "stalled connections are closed");
    assert!(service.terminate().await.success());
}

#[tokio::test]
async fn a_body_that_stops_gets_408_with_the_json_error_and_the_connection_closes() {
    let service = spawn_binary(&[("HTTP_BODY_TIMEOUT", "1s")]).await;
    for partial in [PARTIAL_BODY, STOPPED_CHUNKS] {
        let mut stream = stalled(&service, partial).await.unwrap();
        let reply = until_closed(&mut stream, Duration::from_secs(20))
            .await
            .expect("the service answers and closes");
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
        assert!(
            reply.to_ascii_lowercase().contains("connection: close"),
            "{reply}"
        );
        assert!(reply.contains(r#""code":"body_timeout""#), "{reply}");
    }
    let state = service
        .get_json(&reqwest::Client::new(), "/admin/state")
        .await;
    assert_eq!(state["queue"]["depth"], 0, "nothing was stored or queued");
    assert!(service.terminate().await.success());
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not() {
    let service = spawn_binary(&[("HTTP_IDLE_TIMEOUT", "1s")]).await;
    let mut stream = TcpStream::connect(service.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: lab\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive after the answer, then closed once idle.
    let rest = until_closed(&mut stream, Duration::from_secs(20))
        .await
        .expect("the idle connection was closed");
    assert!(rest.is_empty(), "nothing more was sent");

    // A response that takes longer than the idle timeout is not cut.
    let client = reqwest::Client::new();
    let profile = client
        .get(service.url("/debug/pprof/profile?seconds=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(profile.status(), 200);
    assert!(!profile.bytes().await.unwrap().is_empty());
    assert!(service.terminate().await.success());
}

#[tokio::test]
async fn sigterm_with_stalled_connections_exits_without_waiting_for_them() {
    let service = spawn_binary(&[
        ("SHUTDOWN_TIMEOUT", "30s"),
        ("HTTP_HEADER_READ_TIMEOUT", "60s"),
        ("HTTP_BODY_TIMEOUT", "60s"),
        ("HTTP_IDLE_TIMEOUT", "60s"),
    ])
    .await;
    let mut held = Vec::new();
    for bytes in [
        b"".as_slice(),
        PARTIAL_HEADERS,
        PARTIAL_BODY,
        STOPPED_CHUNKS,
    ] {
        held.push(stalled(&service, bytes).await.unwrap());
    }
    // An idle keep-alive connection too.
    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(service.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = service.logs.clone();
    let status = service.terminate().await;
    let logs = logs.lock().unwrap().join("\n");
    assert!(status.success(), "{logs}");
    // Had a stalled connection been waited for, the server's step would have
    // run out of SHUTDOWN_TIMEOUT and said so.
    assert!(
        !logs.contains("in-flight requests did not finish"),
        "a stalled connection held up the stop: {logs}"
    );
    assert!(logs.contains("shutdown complete"), "{logs}");
}

/// The body timeout bounds the whole body, not each piece of it: a body
/// dripped slower than the limit allows in total gets 408 once the limit
/// has passed since the service first waited for it, however often a
/// byte arrives. On the paused clock, over an in-memory connection to the
/// server's own accept loop.
#[tokio::test(start_paused = true)]
async fn a_body_dripped_slower_than_the_limit_allows_in_total_gets_408_at_the_limit() {
    let (mut conn, stop, _lab) = memory_server().await;
    let started = tokio::time::Instant::now();
    conn.write_all(PARTIAL_BODY).await.unwrap();
    // One more byte every 3 s: never 10 s without one, but the whole body
    // (100 bytes) would take minutes.
    let dripping = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                read = conn.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return (got, tokio::time::Instant::now()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(Duration::from_secs(3)) => {
                    if conn.write_all(b" ").await.is_err() {
                        return (got, tokio::time::Instant::now());
                    }
                }
            }
        }
    });
    let (answer, closed) = tokio::time::timeout(Duration::from_secs(120), dripping)
        .await
        .expect("the body timeout ends it")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    let took = closed - started;
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(13),
        "closed after {took:?}"
    );
    stop.cancel();
}

/// The server's own accept loop over the in-memory transport, on the paused
/// clock, with a 10 s header timeout and a 60 s idle timeout; a connection
/// to it.
async fn memory_server() -> (
    reliability_lab::transport::Connection,
    tokio_util::sync::CancellationToken,
    crate::helpers::Lab,
) {
    use reliability_lab::http::server::{serve, Timeouts};
    use reliability_lab::transport::{self, Listener, Target};
    let lab = crate::helpers::Lab::new(crate::helpers::LabOptions::default()).await;
    let (connector, listener) = transport::memory();
    let stop = tokio_util::sync::CancellationToken::new();
    let timeouts = Timeouts {
        header_read: Duration::from_secs(10),
        body: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };
    tokio::spawn(serve(
        Listener::Memory(listener),
        lab.router.clone(),
        timeouts,
        stop.clone(),
    ));
    let conn = Target::Memory(connector).connect().await.unwrap();
    (conn, stop, lab)
}

/// One `GET /healthz` on the connection, answered 200; it stays open.
async fn healthz(conn: &mut reliability_lab::transport::Connection) {
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: lab\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// Reads until the server closes the connection (or `limit` passes):
/// what it sent, and how long after `since` it closed.
async fn read_until_closed(
    conn: &mut reliability_lab::transport::Connection,
    since: tokio::time::Instant,
    limit: Duration,
) -> Option<(Vec<u8>, Duration)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(limit, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| (got, since.elapsed()))
}

/// A keep-alive connection waiting for its next request is idle, not slow:
/// it stays open past the header timeout and closes at the idle timeout.
#[tokio::test(start_paused = true)]
async fn a_keep_alive_connection_lasts_the_idle_timeout_not_the_header_timeout() {
    let (mut conn, stop, _lab) = memory_server().await;
    healthz(&mut conn).await;
    let answered = tokio::time::Instant::now();
    let (rest, took) = read_until_closed(&mut conn, answered, Duration::from_secs(120))
        .await
        .expect("closed once idle");
    assert!(rest.is_empty());
    assert!(
        took >= Duration::from_secs(60) && took <= Duration::from_secs(76),
        "closed {took:?} after the answer"
    );
    stop.cancel();
}

/// A connection that sends nothing is closed at the header timeout (from
/// its start), and so is one whose headers drip in a byte every 3 s (never
/// idle, never whole).
#[tokio::test(start_paused = true)]
async fn headers_that_do_not_arrive_in_time_close_the_connection_at_the_header_timeout() {
    let (mut silent, stop, _lab) = memory_server().await;
    let started = tokio::time::Instant::now();
    let (_, took) = read_until_closed(&mut silent, started, Duration::from_secs(60))
        .await
        .expect("a silent connection is closed");
    assert!(
        took >= Duration::from_secs(10) && took <= Duration::from_secs(13),
        "silent: closed after {took:?}"
    );
    stop.cancel();

    // After one answered request, the next one's headers drip.
    let (mut conn, stop, _lab) = memory_server().await;
    healthz(&mut conn).await;
    // Off the server's 2.5 s looks, so a timer that closed early shows.
    tokio::time::sleep(Duration::from_secs(21)).await;
    let first_byte = tokio::time::Instant::now();
    let (mut reader, mut writer) = tokio::io::split(conn);
    let drip = tokio::spawn(async move {
        for byte in PARTIAL_HEADERS.iter().cycle() {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    });
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut sink))
        .await
        .expect("the dripping connection is closed")
        .ok();
    let took = first_byte.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took <= Duration::from_secs(13),
        "dripped: closed {took:?} after the first byte"
    );
    drip.abort();
    stop.cancel();
}
