//! Certificates for the TLS tests, made with the `openssl` command: a
//! certificate authority, a server certificate it signs for `localhost`
//! (and no IP address, so verify-full against 127.0.0.1 must fail), and a
//! second authority that signed nothing here.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::postgres::run;

pub struct TestCerts {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub wrong_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCerts {
    /// Fresh certificates in a temporary directory (removed on drop).
    pub fn generate() -> Self {
        let dir =
            std::env::temp_dir().join(format!("rlab-certs-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            run(Command::new("openssl").args(args).current_dir(&dir)).unwrap_or_else(|e| {
                panic!("the TLS tests make their certificates with the openssl command (Debian: apt-get install openssl): {e}")
            })
        };
        for name in ["ca", "wrong-ca"] {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=reliability-lab test {name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
            ]);
        }
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        Self {
            ca: dir.join("ca.crt"),
            wrong_ca: dir.join("wrong-ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed server certificate made as the PostgreSQL manual makes one
/// ("Creating Certificates": `openssl req -new -x509 -days 365 -nodes -text
/// -out server.crt -keyout server.key -subj "/CN=dbhost"`), for the host
/// `cn`. Its file is also what the client is given as its root.
pub struct SelfSigned {
    dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl SelfSigned {
    pub fn make(cn: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rlab-self-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("openssl")
            .args(["req", "-new", "-x509", "-days", "365", "-nodes", "-text"])
            .args(["-out", "server.crt", "-keyout", "server.key"])
            .args(["-subj", &format!("/CN={cn}")])
            .current_dir(&dir))
        .unwrap_or_else(|e| panic!("openssl req (Debian: apt-get install openssl): {e}"));
        Self {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            dir,
        }
    }
}

impl Drop for SelfSigned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
