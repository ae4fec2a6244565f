//! The child processes of an experiment: this program's own executable,
//! started as a replica of the service or as a payment provider, on a free
//! loopback port, its log kept for the error when it fails.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use axum::body::Body;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long a process may take to listen.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Log lines kept per process, for the error when one fails.
const LOG_LINES: usize = 40;

fn keep(logs: &Mutex<VecDeque<String>>, line: String) {
    let mut logs = logs.lock().unwrap_or_else(|p| p.into_inner());
    if logs.len() == LOG_LINES {
        logs.pop_front();
    }
    logs.push_back(line);
}

/// A child process of this binary that has said where it listens.
pub struct Started {
    pub child: Child,
    pub addr: SocketAddr,
    /// Its lease owner id, from its log (a service's; empty for others).
    pub owner: String,
    pub logs: Arc<Mutex<VecDeque<String>>>,
}

/// Starts `binary args…` with `env` (and nothing else of this process's
/// environment but PATH) on a free loopback port, and waits until it logs
/// `listening` with its address (and, when `wants_owner`, its replica id).
pub async fn start_process(
    binary: &Path,
    args: &[&str],
    name: &str,
    env: &[(String, String)],
    listening: &str,
    wants_owner: bool,
) -> anyhow::Result<Started> {
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("{name}: cannot start {}", binary.display()))?;
    let logs = Arc::new(Mutex::new(VecDeque::new()));
    let (found, mut found_rx) = tokio::sync::mpsc::unbounded_channel::<(bool, String)>();
    let stdout = tokio::io::BufReader::new(child.stdout.take().expect("piped"));
    let sink = logs.clone();
    let listening_message = listening.to_owned();
    tokio::spawn(async move {
        let mut lines = stdout.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == listening_message.as_str() {
                    let _ = found.send((true, v["addr"].as_str().unwrap_or("").to_owned()));
                } else if let Some(owner) = v["replica"].as_str() {
                    let _ = found.send((false, owner.to_owned()));
                }
            }
            keep(&sink, line);
        }
    });
    let stderr = tokio::io::BufReader::new(child.stderr.take().expect("piped"));
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut lines = stderr.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            keep(&sink, line);
        }
    });
    let deadline = Instant::now() + START_LIMIT;
    let (mut addr, mut owner) = (None, None);
    while addr.is_none() || (wants_owner && owner.is_none()) {
        tokio::select! {
            got = found_rx.recv() => match got {
                Some((true, a)) => addr = Some(a),
                Some((false, o)) => owner = Some(o),
                None => {
                    // Its output ended: it exited.
                    let status = child.wait().await.ok();
                    let logs = logs.lock().unwrap_or_else(|p| p.into_inner());
                    bail!(
                        "{name} exited before it listened ({}):\n{}",
                        status.map_or("unknown status".into(), |s| s.to_string()),
                        logs.iter().cloned().collect::<Vec<_>>().join("\n")
                    );
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                bail!("{name} did not listen within {START_LIMIT:?}");
            }
        }
    }
    let addr: SocketAddr = addr
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("{name}: the address it logged"))?;
    Ok(Started {
        child,
        addr,
        owner: owner.unwrap_or_default(),
        logs,
    })
}

/// One HTTP/1.1 request to a process; its status and body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> anyhow::Result<(u16, axum::body::Bytes)> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut builder = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => builder
                .header("content-type", "application/json")
                .body(Body::from(body))?,
            None => builder.body(Body::empty())?,
        };
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(Body::new(response.into_body()), 64 << 20).await?;
        Ok::<_, anyhow::Error>((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow!("{method} {path}: no answer within 10s"))?
}

pub fn sigterm(child: &Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}
