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

/// Whether a path is the operator's: `/admin` and `/debug` and everything
/// under them, whatever the method and whether a route matches.
pub fn is_operator_path(path: &str) -> bool {
    ["/admin", "/debug"].iter().any(|prefix| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// The answer for a request to an operator path that does not carry the
/// admin token (when one is set), or None when it may pass: 400 for two
/// `Authorization` headers, 401 otherwise, marked `Refused`.
pub fn refusal(state: &AppState, request: &Request) -> Option<Response> {
    refusal_for(state.admin_token.as_ref(), request)
}

/// `refusal`, against a token given directly (the provider's).
pub fn refusal_for(expected: Option<&AdminToken>, request: &Request) -> Option<Response> {
    let expected = expected?;
    if !is_operator_path(request.uri().path()) {
        return None;
    }
    let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
    let (first, second) = (values.next(), values.next());
    if second.is_some() {
        return Some(
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "duplicate_header",
                "send one Authorization header, not several",
            )
            .with_field("Authorization")
            .into_response(),
        );
    }
    let presented = first
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    if expected.matches(presented) {
        return None;
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
    response.extensions_mut().insert(Refused);
    Some(response)
}

/// Guards the operator routes (`/admin`, `/debug`) with the admin token,
/// when one is set. It is a route layer, so requests to other routes never
/// pay for it; the router's fallbacks make the same check for operator
/// paths that match no route or no method, so a stranger gets the same 401
/// whatever the method and learns nothing of the routes.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match refusal(&state, &request) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

/// Marks a response the token check refused.
#[derive(Clone, Copy)]
pub struct Refused;

/// A refused request learns nothing of the routes: axum's method router adds
/// `Allow` (the methods the path takes) after the route's layers have run,
/// so it is taken off here, outside the router.
pub fn hide_routes_from_strangers(mut response: Response) -> Response {
    if response.extensions().get::<Refused>().is_some() {
        response.headers_mut().remove(header::ALLOW);
    }
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
    fn operator_paths_are_admin_and_debug_and_below() {
        for path in [
            "/admin",
            "/admin/",
            "/admin/state",
            "/debug/pprof/heap",
            "/debug",
        ] {
            assert!(is_operator_path(path), "{path}");
        }
        for path in [
            "/",
            "/orders",
            "/administrator",
            "/debugger",
            "/metrics",
            "/x/admin",
        ] {
            assert!(!is_operator_path(path), "{path}");
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
