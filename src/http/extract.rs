//! A JSON body extractor whose every refusal is a clear `ApiError`:
//! 415 for another content type, 413 over the body limit, 400 for malformed
//! JSON, 422 for well-formed JSON with a missing, mistyped or unknown field
//! (naming the field).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::ApiError;

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 16 * 1024;

pub struct JsonBody<T>(pub T);

fn is_json(content_type: &str) -> bool {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .as_bytes();
    let (prefix, suffix) = (b"application/".as_slice(), b"+json".as_slice());
    mime.eq_ignore_ascii_case(b"application/json")
        || (mime.len() > prefix.len() + suffix.len()
            && mime[..prefix.len()].eq_ignore_ascii_case(prefix)
            && mime[mime.len() - suffix.len()..].eq_ignore_ascii_case(suffix))
}

/// The field a serde error is about: the path when there is one, else the
/// first name in backticks (`missing field `amount``, `unknown field `x``).
fn field_of(path: &str, message: &str) -> Option<String> {
    if !path.is_empty() && path != "." {
        return Some(path.to_owned());
    }
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_json(content_type) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body must be at most {BODY_LIMIT} bytes"),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unreadable_body",
                    "the request body could not be read",
                )
            }
        })?;
        // One parse on the happy path. On a shape error, check the syntax of
        // the whole body: a syntax error anywhere makes it malformed (400),
        // whatever its fields; otherwise it is a field problem (422).
        let malformed = |err: serde_json::Error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {err}"),
            )
        };
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Ok(value) => {
                de.end().map_err(malformed)?;
                value
            }
            Err(err) => {
                if let Err(syntax) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                    return Err(malformed(syntax));
                }
                let path = err.path().to_string();
                let message = err.into_inner().to_string();
                let mut api =
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", &message);
                api.field = field_of(&path, &message);
                return Err(api);
            }
        };
        Ok(JsonBody(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_recognised() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("Application/JSON"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
        assert!(!is_json("application/jsonx"));
    }

    #[test]
    fn the_field_comes_from_the_path_or_the_message() {
        assert_eq!(field_of("amount", "invalid type"), Some("amount".into()));
        assert_eq!(
            field_of(".", "missing field `amount` at line 1"),
            Some("amount".into())
        );
        assert_eq!(field_of(".", "no field here"), None);
    }
}
