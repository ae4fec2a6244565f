//! The service binary as a child process: started with a clean environment,
//! its log lines collected, stopped with SIGTERM or SIGKILL.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::http::ORDER_BODY;
use super::postgres::run;

/// The service binary running as a child process, with its log lines.
pub struct Running {
    pub child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    pub logs: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Starts the binary with a clean environment plus `env`, listening on a
/// free loopback port, and waits until it says it listens.
pub async fn spawn_binary(env: &[(&str, &str)]) -> Running {
    spawn_binary_limited(env, None).await
}

/// Like `spawn_binary`, with the process's open-file limit lowered to
/// `max_files` when given (to run it out of file descriptors).
pub async fn spawn_binary_limited(env: &[(&str, &str)], max_files: Option<u64>) -> Running {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_reliability-lab"));
    if let Some(limit) = max_files {
        // SAFETY: setrlimit is async-signal-safe, and the closure touches
        // nothing else between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("the binary starts");
    let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (addr_tx, mut addr_rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut lines = stdout.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["message"] == "reliability-lab listening" {
                    let _ = addr_tx.send(v["addr"].as_str().unwrap_or("").to_owned());
                }
            }
            sink.lock().unwrap().push(line);
        }
    });
    let stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut lines = stderr.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    let addr = tokio::time::timeout(Duration::from_secs(30), addr_rx.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("the binary never listened: {:?}", logs.lock().unwrap()));
    Running {
        child,
        addr: addr.parse().unwrap(),
        logs,
    }
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Creates an order over HTTP, asserting 201, and returns its JSON.
    pub async fn post_order(&self, client: &reqwest::Client) -> Value {
        let response = client
            .post(self.url("/orders"))
            .header("content-type", "application/json")
            .body(ORDER_BODY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }

    /// GETs `path` and returns its JSON body.
    pub async fn get_json(&self, client: &reqwest::Client, path: &str) -> Value {
        client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// SIGKILL: the process dies at whatever instruction it was on.
    pub async fn kill_hard(mut self) {
        self.child.kill().await.expect("SIGKILL delivered");
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running");
        run(std::process::Command::new("kill").args(["-TERM", &pid.to_string()])).unwrap();
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap()
    }
}

/// One client per URL of `targets`, each posting `per_client` orders one
/// after another, every one answered 201; returns when all have.
pub async fn post_from_clients(targets: &[String], per_client: usize) {
    let clients: Vec<_> = targets
        .iter()
        .cloned()
        .map(|target| {
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                for _ in 0..per_client {
                    let r = client
                        .post(&target)
                        .header("content-type", "application/json")
                        .body(ORDER_BODY)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
}
