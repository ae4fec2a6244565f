//! A JSON body extractor whose every refusal is a clear `ApiError`:
//! 415 for another content type, 413 over the body limit, 408 when the body
//! does not arrive in time, 400 for malformed JSON (invalid UTF-8 included),
//! 422 for well-formed JSON that is not an object or has a missing, mistyped
//! or unknown field (naming the field). Messages speak JSON, never Rust: no
//! type names of ours reach the client.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::ApiError;
use crate::http::server::BodyTimedOut;

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 16 * 1024;

pub struct JsonBody<T>(pub T);

/// `application/json`, with at most a `charset=utf-8` parameter (JSON is
/// UTF-8: RFC 8259, section 8.1). Anything else is another media type.
fn is_json(content_type: &str) -> bool {
    let mut parts = content_type.split(';');
    let mime = parts.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return false;
    }
    parts.all(|param| {
        let param = param.trim();
        match param.split_once('=') {
            Some((name, value)) => {
                name.trim().eq_ignore_ascii_case("charset")
                    && value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
            }
            None => param.is_empty(),
        }
    })
}

/// serde's words for the types it expected, in JSON's terms.
fn in_json_terms(message: &str) -> String {
    const INTEGERS: [&str; 12] = [
        "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16", "u32", "u64", "u128", "usize",
    ];
    let Some(at) = message.find("expected ") else {
        return message.to_owned();
    };
    let (head, rest) = message.split_at(at + "expected ".len());
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ' '))
        .unwrap_or(rest.len());
    let (what, tail) = rest.split_at(end);
    let word = what.split(' ').next().unwrap_or("");
    let replaced = if INTEGERS.contains(&word) {
        format!("a whole number{}", &what[word.len()..])
    } else if word == "f32" || word == "f64" {
        format!("a number{}", &what[word.len()..])
    } else if let Some(name) = what.strip_prefix("struct ") {
        // "struct CreateOrderRequest at line 1": keep what follows the name.
        let after = name.find(' ').map_or("", |i| &name[i..]);
        format!("an object{after}")
    } else if let Some(name) = what.strip_prefix("enum ") {
        let after = name.find(' ').map_or("", |i| &name[i..]);
        format!("one of the documented values{after}")
    } else {
        what.to_owned()
    };
    format!("{head}{replaced}{tail}")
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
            } else if caused_by_timeout(&rejection) {
                ApiError::body_timeout()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unreadable_body",
                    "the request body could not be read",
                )
            }
        })?;
        let malformed = |reason: String| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {reason}"),
            )
        };
        // JSON text is UTF-8; serde_json skips over the bytes of strings it
        // ignores without checking them, so check the whole body first.
        if let Err(err) = std::str::from_utf8(&bytes) {
            return Err(malformed(format!(
                "invalid UTF-8 at byte {}",
                err.valid_up_to()
            )));
        }
        // Every body this service takes is an object; serde would also fill a
        // struct from an array, field by field.
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
        if first != Some(b'{') {
            if let Err(syntax) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                return Err(malformed(syntax.to_string()));
            }
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "the body must be a JSON object",
            ));
        }
        // No body this service takes holds an array, and serde would fill a
        // nested object from one by position (`"brownout": [0.5, "1ms", …]`).
        // A body without a `[` (nearly all) is not looked at twice.
        if bytes.contains(&b'[') {
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                if let Some(path) = first_array(&value, "") {
                    let mut api = ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_field",
                        format!("{path}: expected an object or a single value, found an array"),
                    );
                    api.field = Some(path);
                    return Err(api);
                }
            }
        }
        // One parse on the happy path. On a shape error, check the syntax of
        // the whole body: a syntax error anywhere makes it malformed (400),
        // whatever its fields; otherwise it is a field problem (422).
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Ok(value) => {
                de.end().map_err(|e| malformed(e.to_string()))?;
                value
            }
            Err(err) => {
                if let Err(syntax) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                    return Err(malformed(syntax.to_string()));
                }
                let path = err.path().to_string();
                let message = in_json_terms(&err.into_inner().to_string());
                let mut api =
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", &message);
                api.field = field_of(&path, &message);
                return Err(api);
            }
        };
        Ok(JsonBody(value))
    }
}

/// Where the first array in `value` is, as a dotted path of field names.
fn first_array(value: &serde_json::Value, path: &str) -> Option<String> {
    match value {
        serde_json::Value::Array(_) => Some(path.to_owned()),
        serde_json::Value::Object(fields) => fields.iter().find_map(|(name, v)| {
            let inner = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            first_array(v, &inner)
        }),
        _ => None,
    }
}

/// Whether reading the body failed because it did not arrive in time.
fn caused_by_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if err.is::<BodyTimedOut>() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_recognised() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/json;charset=\"UTF-8\""));
        assert!(is_json("Application/JSON"));
        for other in [
            "application/merge-patch+json",
            "application/json; charset=latin1",
            "application/json; boundary=x",
            "text/plain",
            "",
            "application/jsonx",
            "application/json, text/plain",
        ] {
            assert!(!is_json(other), "{other}");
        }
    }

    #[test]
    fn serde_type_names_become_json_words() {
        for (raw, expected) in [
            (
                "invalid type: string \"x\", expected i64 at line 1 column 9",
                "invalid type: string \"x\", expected a whole number at line 1 column 9",
            ),
            (
                "invalid type: floating point `1.5`, expected u32",
                "invalid type: floating point `1.5`, expected a whole number",
            ),
            (
                "invalid type: string \"a\", expected f64",
                "invalid type: string \"a\", expected a number",
            ),
            (
                "invalid type: sequence, expected struct BrownoutRequest at line 1 column 30",
                "invalid type: sequence, expected an object at line 1 column 30",
            ),
            ("missing field `amount`", "missing field `amount`"),
            (
                "invalid type: integer `1`, expected a string",
                "invalid type: integer `1`, expected a string",
            ),
        ] {
            assert_eq!(in_json_terms(raw), expected);
        }
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
