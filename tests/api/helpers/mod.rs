//! The shared harness, one file per concern: an in-process service built by
//! the library's composition root (`app`), HTTP helpers (`http`), throwaway
//! PostgreSQL servers and databases (`postgres`), and the service binary run
//! as a child process (`binary`).

#![allow(dead_code, unused_imports)]

mod app;
mod binary;
mod browser;
mod http;
mod postgres;
mod tls;

pub use app::*;
pub use binary::*;
pub use browser::*;
pub use http::*;
pub use postgres::*;
pub use tls::*;

/// The repository's root: where README.md, docs/ and deploy/ are.
pub fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
