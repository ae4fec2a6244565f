//! `DATABASE_URL` to connect options, with TLS as libpq does it.
//!
//! sqlx reads `sslmode`, `sslrootcert`, `sslcert` and `sslkey` from the
//! URL, and its TLS is native-tls: OpenSSL here, the library libpq uses, so
//! a certificate verifies as `psql` verifies it. (With rustls, sqlx refused
//! the commonest setup, a self-signed server certificate given as its own
//! root, as the PostgreSQL manual makes one: webpki rejects a CA
//! certificate used as the server's, `CaUsedAsEndEntity`.) Where sqlx's
//! behaviour differs from libpq's, libpq's wins, and this module closes the
//! gap:
//!
//! - `sslmode=require` with a `sslrootcert` verifies the server's chain,
//!   as `verify-ca` does (libpq: "if a root CA file exists, require behaves
//!   like verify-ca"). sqlx alone would take any certificate.
//! - `verify-ca` and `verify-full` need a root: a CA file, or
//!   `sslrootcert=system` for the public roots. sqlx alone would quietly
//!   trust the system's roots; libpq refuses without a root file.
//! - `sslrootcert=system` (libpq 16) means the system's roots (OpenSSL's
//!   default store) and makes `verify-full` the mode; a weaker mode with it
//!   is refused, as libpq refuses it. sqlx alone would look for a file named
//!   `system`.
//! - The CA file is read once, here, so a missing or empty file is an error
//!   that names it, at startup, instead of a failure on every connection.
//!   native-tls takes one certificate from it, so a file of several (a
//!   bundle) is refused, naming the count, rather than trusting only its
//!   first.
//!
//! One difference remains: with a CA file, native-tls trusts the system's
//! roots as well as the file (libpq trusts the file alone), so a server
//! certificate from a public CA verifies whatever file is named.
//!
//! A TLS failure while connecting is not worth retrying: [`tls_failure`]
//! tells the startup loop, and words the cause for the operator.

use std::borrow::Cow;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// `DATABASE_URL`'s connect options, with TLS settled as described above.
pub fn connect_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    let root = root_cert_setting(url)?;
    // sqlx must not see sslrootcert=system (it would read a file of that
    // name); every other parameter it parses itself.
    let cleaned = match root {
        Some(RootSetting::System) => without_param(url, "sslrootcert"),
        _ => Cow::Borrowed(url),
    };
    let options: PgConnectOptions = cleaned
        .parse()
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid Postgres URL: {e}"))?;
    let mode = options.get_ssl_mode();
    let explicit_mode = query_param(url, "sslmode")?.is_some()
        || std::env::var_os("PGSSLMODE").is_some_and(|v| !v.is_empty());
    match root {
        Some(RootSetting::System) => {
            if explicit_mode && !matches!(mode, PgSslMode::VerifyFull) {
                anyhow::bail!(
                    "DATABASE_URL: sslrootcert=system needs sslmode=verify-full (it is {}): \
                     the public roots prove nothing without the host name",
                    mode_name(mode)
                );
            }
            Ok(options.ssl_mode(PgSslMode::VerifyFull))
        }
        Some(RootSetting::File(path)) => {
            let pem = read_root_file(&path)?;
            let options = options.ssl_root_cert_from_pem(pem);
            Ok(match mode {
                PgSslMode::Require => options.ssl_mode(PgSslMode::VerifyCa),
                _ => options,
            })
        }
        None => {
            if matches!(mode, PgSslMode::VerifyCa | PgSslMode::VerifyFull) {
                anyhow::bail!(
                    "DATABASE_URL: sslmode={} needs sslrootcert: the CA file that signed the \
                     server's certificate, or sslrootcert=system for the public roots",
                    mode_name(mode)
                );
            }
            Ok(options)
        }
    }
}

/// The operator's words for a failed connection when TLS is what failed,
/// None when the failure was something else (worth retrying at startup).
///
/// sqlx reports a failed handshake, and a server without TLS, as its
/// `Error::Tls`; OpenSSL says why a certificate did not verify in its
/// message (its verify result's text), which is read here.
pub fn tls_failure(err: &sqlx::Error, options: &PgConnectOptions) -> Option<String> {
    let sqlx::Error::Tls(cause) = err else {
        return None;
    };
    let mode = mode_name(options.get_ssl_mode());
    let host = options.get_host();
    let cause = cause.to_string();
    let said = |words: &[&str]| {
        let lower = cause.to_ascii_lowercase();
        words.iter().any(|w| lower.contains(w))
    };
    let why = if said(&["does not support tls"]) {
        "the server does not offer TLS (is ssl=on in its postgresql.conf?)".to_owned()
    } else if said(&["hostname mismatch", "ip address mismatch"]) {
        format!(
            "the server's certificate does not name the host {host:?} \
             (sslmode=verify-full checks the name; verify-ca does not)"
        )
    } else if said(&[
        "unable to get local issuer certificate",
        "unable to get issuer certificate",
        "self-signed certificate",
        "self signed certificate",
        "unable to verify the first certificate",
    ]) {
        "the server's certificate was not issued by a CA in sslrootcert (nor is it the \
         certificate in sslrootcert)"
            .to_owned()
    } else if said(&["certificate has expired", "certificate is not yet valid"]) {
        "the server's certificate is outside its validity period".to_owned()
    } else if said(&["certificate verify failed"]) {
        "the server's certificate did not verify".to_owned()
    } else {
        "the TLS handshake failed".to_owned()
    };
    Some(format!(
        "TLS to the database at {host} failed (sslmode={mode}): {why}: {cause}"
    ))
}

enum RootSetting {
    System,
    File(String),
}

fn root_cert_setting(url: &str) -> anyhow::Result<Option<RootSetting>> {
    let value = match query_param(url, "sslrootcert")? {
        Some(v) => Some(v),
        None => std::env::var("PGSSLROOTCERT").ok(),
    };
    Ok(value.filter(|v| !v.is_empty()).map(|v| {
        if v == "system" {
            RootSetting::System
        } else {
            RootSetting::File(v)
        }
    }))
}

fn read_root_file(path: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("DATABASE_URL: sslrootcert {path}: {e}"))?;
    let text = String::from_utf8_lossy(&pem);
    match text.matches("-----BEGIN CERTIFICATE-----").count() {
        0 => anyhow::bail!("DATABASE_URL: sslrootcert {path}: no PEM certificate in the file"),
        1 => Ok(pem),
        n => anyhow::bail!(
            "DATABASE_URL: sslrootcert {path}: {n} certificates in the file; this build trusts \
             one: put the CA that signed the server's certificate (or the self-signed server \
             certificate itself) alone in the file"
        ),
    }
}

/// The last value of one query parameter (the URL parser sqlx uses).
fn query_param(url: &str, name: &str) -> anyhow::Result<Option<String>> {
    let parsed = url::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid Postgres URL: {e}"))?;
    Ok(parsed
        .query_pairs()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .last())
}

/// The URL without one query parameter.
fn without_param<'a>(url: &'a str, name: &str) -> Cow<'a, str> {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return Cow::Borrowed(url);
    };
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| k != name)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    Cow::Owned(parsed.into())
}

fn mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        connect_options(url).unwrap_err().to_string()
    }

    #[test]
    fn plain_urls_keep_sqlx_defaults() {
        let o = connect_options("postgres://u@localhost/db").unwrap();
        assert!(matches!(o.get_ssl_mode(), PgSslMode::Prefer));
        let o = connect_options("postgres://u@localhost/db?sslmode=require").unwrap();
        assert!(matches!(o.get_ssl_mode(), PgSslMode::Require));
    }

    #[test]
    fn verifying_modes_need_a_root() {
        for mode in ["verify-ca", "verify-full"] {
            let e = err(&format!("postgres://u@localhost/db?sslmode={mode}"));
            assert!(
                e.contains(&format!("sslmode={mode} needs sslrootcert")),
                "{e}"
            );
        }
    }

    #[test]
    fn require_with_a_root_file_verifies_the_chain() {
        let dir = std::env::temp_dir().join(format!("rlab-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.crt");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let url = format!(
            "postgres://u@localhost/db?sslmode=require&sslrootcert={}",
            ca.display()
        );
        let o = connect_options(&url).unwrap();
        assert!(matches!(o.get_ssl_mode(), PgSslMode::VerifyCa));
        let url = format!(
            "postgres://u@localhost/db?sslmode=verify-full&sslrootcert={}",
            ca.display()
        );
        assert!(matches!(
            connect_options(&url).unwrap().get_ssl_mode(),
            PgSslMode::VerifyFull
        ));
        std::fs::write(&ca, "not a certificate").unwrap();
        let e = err(&url);
        assert!(e.contains("no PEM certificate"), "{e}");
        let one = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        std::fs::write(&ca, one.repeat(2)).unwrap();
        let e = err(&url);
        assert!(e.contains("2 certificates in the file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_root_file_is_named() {
        let e =
            err("postgres://u@localhost/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn system_roots_mean_verify_full() {
        let o = connect_options("postgres://u@db.example.com/db?sslrootcert=system").unwrap();
        assert!(matches!(o.get_ssl_mode(), PgSslMode::VerifyFull));
        let o = connect_options(
            "postgres://u@db.example.com/db?sslmode=verify-full&sslrootcert=system&application_name=x",
        )
        .unwrap();
        assert!(matches!(o.get_ssl_mode(), PgSslMode::VerifyFull));
        assert_eq!(o.get_application_name(), Some("x"));
        let e = err("postgres://u@db.example.com/db?sslmode=require&sslrootcert=system");
        assert!(
            e.contains("sslrootcert=system needs sslmode=verify-full (it is require)"),
            "{e}"
        );
    }

    #[test]
    fn without_param_keeps_the_rest() {
        assert_eq!(
            without_param(
                "postgres://u@h/db?a=1&sslrootcert=system&b=2",
                "sslrootcert"
            ),
            "postgres://u@h/db?a=1&b=2"
        );
        assert_eq!(
            without_param("postgres://u@h/db?sslrootcert=system", "sslrootcert"),
            "postgres://u@h/db"
        );
    }
}
