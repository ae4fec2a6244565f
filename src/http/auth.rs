//! Bearer-token protection for `/admin` and `/debug`.
//!
//! The presented token and the expected one are both hashed with SHA-256 and
//! the digests compared in constant time, so the time taken says nothing
//! about how much of a guess was right (nor about the token's length).

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// The expected token, kept only as its digest.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    pub fn new(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.ct_eq(&digest).into()
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme name
/// is case-insensitive (RFC 9110, section 11.1), the token is not.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.admin_token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    if expected.matches(presented) {
        return next.run(request).await;
    }
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this endpoint needs Authorization: Bearer <ADMIN_TOKEN>",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        "Bearer".parse().expect("valid header"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_is_not() {
        for value in ["Bearer tok", "bearer tok", "BEARER tok", "bEaReR  tok"] {
            assert_eq!(bearer_token(value), Some("tok"), "{value}");
        }
        assert_eq!(bearer_token("Bearer TOK"), Some("TOK"));
        for value in ["Basic tok", "Bearertok", "tok", "", "Bear tok"] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }

    #[test]
    fn only_the_exact_token_matches() {
        let token = AdminToken::new("s3cret-token");
        assert!(token.matches("s3cret-token"));
        for wrong in [
            "",
            "s3cret-toke",
            "s3cret-token ",
            "S3cret-token",
            "s3cret-token-and-more",
        ] {
            assert!(!token.matches(wrong), "{wrong:?}");
        }
    }
}
