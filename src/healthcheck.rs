//! `reliability-lab healthcheck [URL]`: asks a running service whether it is
//! ready, for container healthchecks in an image that has no curl.
//!
//! Without a URL it asks `/readyz` on this machine at `LISTEN_ADDR`'s port
//! (8080 by default). Exits 0 when the answer is 2xx, 1 otherwise, with one
//! line on stderr saying what was answered.

use std::process::ExitCode;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Uri;
use hyper_util::rt::TokioIo;

/// How long the whole check may take.
const TIMEOUT: Duration = Duration::from_secs(3);

pub async fn main(args: Vec<String>) -> ExitCode {
    let url = match args.as_slice() {
        [] => default_url(std::env::var("LISTEN_ADDR").ok().as_deref()),
        [url] => url.clone(),
        _ => {
            eprintln!("usage: reliability-lab healthcheck [URL]");
            return ExitCode::from(2);
        }
    };
    match tokio::time::timeout(TIMEOUT, get(&url)).await {
        Ok(Ok((status, _))) if status.is_success() => ExitCode::SUCCESS,
        Ok(Ok((status, body))) => {
            eprintln!("healthcheck: {url} answered {status}: {}", body.trim());
            ExitCode::FAILURE
        }
        Ok(Err(err)) => {
            eprintln!("healthcheck: {url}: {err}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "healthcheck: {url}: no answer within {}",
                humantime::format_duration(TIMEOUT)
            );
            ExitCode::FAILURE
        }
    }
}

/// `/readyz` on the loopback address at the port the service listens on.
fn default_url(listen_addr: Option<&str>) -> String {
    let port = listen_addr
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or(8080);
    format!("http://127.0.0.1:{port}/readyz")
}

async fn get(url: &str) -> anyhow::Result<(hyper::StatusCode, String)> {
    let uri: Uri = url.parse()?;
    if uri.scheme_str() != Some("http") {
        anyhow::bail!("only http:// URLs");
    }
    let host = uri.host().ok_or_else(|| anyhow::anyhow!("no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_follows_listen_addr() {
        assert_eq!(default_url(None), "http://127.0.0.1:8080/readyz");
        assert_eq!(
            default_url(Some("0.0.0.0:9000")),
            "http://127.0.0.1:9000/readyz"
        );
        assert_eq!(
            default_url(Some("[::]:7000")),
            "http://127.0.0.1:7000/readyz"
        );
    }
}
