//! The load client: keep-alive HTTP/1.1 connections on hyper, each sending
//! one request at a time, recording every latency.
//!
//! Closed loop (`rate: None`): each connection sends as fast as answers come,
//! which measures the maximum rate. Open loop (`rate: Some(r)`): requests are
//! scheduled at `r` per second in all, and latency is counted from the
//! scheduled time, so a slow answer that delays the next request is charged
//! to the server (no coordinated omission).
//!
//! Every failure is counted: a non-2xx answer, a send that failed (the
//! connection is then opened again and the phase goes on), and a connect
//! that failed (tried again after a short pause). A phase never panics on the
//! server's behaviour.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

pub const ORDER: &str = r#"{"customer_id":"cust-42","amount":1999,"currency":"USD"}"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Post,
    Get,
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    latencies_us: Vec<u32>,
    /// Locations of created orders (POST), for a later GET phase.
    pub locations: Vec<String>,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// The p-th percentile latency in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us[nearest_rank(self.latencies_us.len(), p)] as f64 / 1000.0
    }
}

/// The index of the p-th percentile in `len` sorted values (`len` > 0).
pub fn nearest_rank(len: usize, p: f64) -> usize {
    ((p / 100.0) * (len - 1) as f64).round() as usize
}

pub struct Phase {
    pub addr: SocketAddr,
    pub kind: Kind,
    pub connections: usize,
    pub duration: Duration,
    /// Requests per second in all, or None for as fast as possible.
    pub rate: Option<f64>,
    /// Paths to GET, cycled through.
    pub targets: Arc<Vec<String>>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Opens one keep-alive connection.
async fn connect(addr: SocketAddr) -> Option<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// What one connection measured.
#[derive(Default)]
struct Measured {
    ok: u64,
    errors: u64,
    latencies: Vec<u32>,
    locations: Vec<String>,
}

async fn connection(phase: Arc<Phase>, index: usize, start: Instant) -> Measured {
    let deadline = start + phase.duration;
    let interval = phase
        .rate
        .map(|r| Duration::from_secs_f64(phase.connections as f64 / r));
    // Spread the open-loop schedules so connections do not fire together.
    let mut next = start
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(index as f64 / phase.connections as f64)
        });
    let mut measured = Measured {
        latencies: Vec::with_capacity(4096),
        ..Measured::default()
    };
    let mut sender: Option<Sender> = None;
    let mut cursor = index;
    loop {
        let scheduled = match interval {
            Some(interval) => {
                tokio::time::sleep_until(next.into()).await;
                let at = next;
                next += interval;
                at
            }
            None => Instant::now(),
        };
        if scheduled >= deadline {
            break;
        }
        let ready = match sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            sender = connect(phase.addr).await;
            if sender.is_none() {
                // The server refused or dropped us: an error, then try again.
                measured.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        }
        let request = match phase.kind {
            Kind::Post => Request::post("/orders")
                .header("host", "bench")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(ORDER.as_bytes())))
                .unwrap(),
            Kind::Get => {
                let path = &phase.targets[cursor % phase.targets.len()];
                cursor += phase.connections;
                Request::get(path.as_str())
                    .header("host", "bench")
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }
        };
        let Some(s) = sender.as_mut() else { continue };
        match s.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                let location = response
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = response.into_body().collect().await;
                let took = scheduled.elapsed();
                if status.is_success() && body.is_ok() {
                    measured.ok += 1;
                    measured
                        .latencies
                        .push(took.as_micros().min(u32::MAX as u128) as u32);
                    if let (Kind::Post, Some(location)) = (phase.kind, location) {
                        if measured.locations.len() < 20_000 {
                            measured.locations.push(location);
                        }
                    }
                } else {
                    measured.errors += 1;
                }
            }
            Err(_) => {
                // The connection broke: count it, reconnect on the next turn.
                measured.errors += 1;
                sender = None;
            }
        }
    }
    measured
}

/// Runs one phase and gathers what every connection measured.
pub async fn run(phase: Phase) -> Outcome {
    let phase = Arc::new(phase);
    let start = Instant::now();
    let tasks: Vec<_> = (0..phase.connections)
        .map(|i| tokio::spawn(connection(phase.clone(), i, start)))
        .collect();
    let mut outcome = Outcome {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        locations: Vec::new(),
    };
    for task in tasks {
        let measured = task.await.expect("connection task");
        outcome.requests += measured.ok;
        outcome.errors += measured.errors;
        outcome.latencies_us.extend(measured.latencies);
        outcome.locations.extend(measured.locations);
    }
    outcome.elapsed = start.elapsed();
    outcome.latencies_us.sort_unstable();
    outcome
}
