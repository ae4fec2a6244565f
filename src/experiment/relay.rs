//! A TCP relay between a replica and Postgres that an experiment or a test
//! controls (a partition on any machine, no network namespaces): it passes
//! bytes both ways until `cut`, which drops every relayed connection at once
//! and holds new ones silent (a connect neither fails nor completes, as
//! across a partition) until `heal`.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay on a free loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, watching) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(relay(client, upstream, watching.clone()));
            }
        });
        Ok(Self { addr, cut, task })
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// `url` with its host and port replaced by the relay's.
    pub fn url_for(&self, url: &str) -> anyhow::Result<String> {
        let mut parsed = url::Url::parse(url)?;
        parsed.set_host(Some("127.0.0.1"))?;
        parsed
            .set_port(Some(self.addr.port()))
            .map_err(|()| anyhow::anyhow!("{url}: cannot carry a port"))?;
        Ok(parsed.into())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    // Accepted while cut: held silent until healed, then closed.
    if *cut.borrow_and_update() {
        let _ = cut.wait_for(|cut| !*cut).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        // Cut: both sockets drop, and with them the connection.
        _ = cut.wait_for(|cut| *cut) => {}
    }
}

/// The address a Postgres URL names (its host resolved, 5432 by default).
pub async fn upstream_of(url: &str) -> anyhow::Result<SocketAddr> {
    let parsed = url::Url::parse(url)?;
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("the database URL names no host"))?;
    let port = parsed.port().unwrap_or(5432);
    let host = host.trim_matches(['[', ']']).to_owned();
    let found = tokio::net::lookup_host((host.as_str(), port)).await?.next();
    found.ok_or_else(|| anyhow::anyhow!("{host} resolves to no address"))
}
