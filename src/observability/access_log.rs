//! The two hottest log lines, written without the generic JSON formatter:
//! the request line and the workers' "order completed".
//!
//! One JSON line per request is the hottest log write in the service. Through
//! tracing-subscriber's JSON formatter it cost 16% of the CPU under
//! `GET /orders/{id}` load (the service's own flame graph: a visitor per
//! field, a serde map, a timestamp formatted from scratch, a String per
//! line). Here the line is written straight into a buffer kept per thread,
//! with the timestamp's date and time reused within a second, and handed to
//! the same batched writer as every other line. The fields and their order
//! are the formatter's: `timestamp`, `level`, `message`, the request's
//! fields, `target`. "order completed", one per order, was the next (9% under
//! `POST /orders` load); it is written the same way, with the job span's
//! `span` object the formatter adds.
//!
//! It applies in JSON mode once `install` ran (`logging::init` does). The
//! log filter still decides: with `reliability_lab::http` below `info` no
//! line is written. Otherwise (pretty mode, tests without a subscriber of
//! ours) `write` says so and the caller logs through tracing.
//!
//! Tests compare each line with the formatter's own, key for key.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use super::batched::BatchedWriter;

/// The target the request line is logged under (and filtered by).
pub const TARGET: &str = "reliability_lab::http";

static SINK: OnceLock<BatchedWriter> = OnceLock::new();

/// Sends request lines to `writer` from now on (JSON mode).
pub fn install(writer: BatchedWriter) {
    let _ = SINK.set(writer);
}

/// One request's fields.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    /// Microseconds; written as milliseconds with three decimals.
    pub latency_us: u64,
}

struct Buffers {
    line: String,
    /// The second the cached prefix is for, and `YYYY-MM-DDTHH:MM:SS`.
    second: u64,
    prefix: String,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = const {
        RefCell::new(Buffers { line: String::new(), second: u64::MAX, prefix: String::new() })
    };
}

/// Writes the request line if this module owns it; false when the caller
/// must log it through tracing instead.
pub fn write(fields: &RequestLine<'_>) -> bool {
    let Some(sink) = SINK.get() else {
        return false;
    };
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return true;
    }
    with_line(sink, |out, second, prefix, now| {
        render(out, second, prefix, now, fields)
    });
    true
}

/// The target of the workers' "order completed" line.
pub const JOB_TARGET: &str = "reliability_lab::workers::job";

/// Writes the worker's "order completed" line (one per order, the hottest
/// line after the request line: 9% of the CPU under `POST /orders` load
/// through the formatter) if this module owns it; false when the caller must
/// log it through tracing. The line is the formatter's, inside the job's
/// span: `span` holds the order id and the span's name.
pub fn write_order_completed(order_id: &uuid::Uuid, attempts: u32) -> bool {
    let Some(sink) = SINK.get() else {
        return false;
    };
    if !tracing::enabled!(target: JOB_TARGET, tracing::Level::INFO) {
        return true;
    }
    with_line(sink, |out, second, prefix, now| {
        render_order_completed(out, second, prefix, now, order_id, attempts)
    });
    true
}

/// Renders one line into the thread's buffer and hands it to `sink`.
fn with_line(
    sink: &BatchedWriter,
    render: impl FnOnce(&mut String, &mut u64, &mut String, std::time::Duration),
) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    BUFFERS.with(|cell| {
        let mut b = cell.borrow_mut();
        let b = &mut *b;
        b.line.clear();
        render(&mut b.line, &mut b.second, &mut b.prefix, now);
        sink.append_line(b.line.as_bytes());
    });
}

/// `{"timestamp":"…","level":"INFO","message":` and the message. `second`
/// and `prefix` cache the timestamp's formatted date and time.
fn open_line(
    out: &mut String,
    second: &mut u64,
    prefix: &mut String,
    now: std::time::Duration,
    message: &str,
) {
    let secs = now.as_secs();
    if *second != secs {
        *second = secs;
        prefix.clear();
        let at = chrono::DateTime::from_timestamp(secs as i64, 0).unwrap_or_default();
        let _ = write!(prefix, "{}", at.format("%Y-%m-%dT%H:%M:%S"));
    }
    out.push_str("{\"timestamp\":\"");
    out.push_str(prefix);
    out.push('.');
    push_digits(out, u64::from(now.subsec_micros()), 6);
    out.push_str("Z\",\"level\":\"INFO\",\"message\":");
    json_string(out, message);
}

/// The whole request line, newline included.
fn render(
    out: &mut String,
    second: &mut u64,
    prefix: &mut String,
    now: std::time::Duration,
    f: &RequestLine<'_>,
) {
    open_line(out, second, prefix, now, "request");
    out.push_str(",\"request_id\":");
    json_string(out, f.request_id);
    out.push_str(",\"method\":");
    json_string(out, f.method);
    out.push_str(",\"path\":");
    json_string(out, f.path);
    out.push_str(",\"route\":");
    json_string(out, f.route);
    out.push_str(",\"status\":");
    push_digits(out, u64::from(f.status), 1);
    out.push_str(",\"latency_ms\":");
    push_digits(out, f.latency_us / 1000, 1);
    out.push('.');
    push_digits(out, f.latency_us % 1000, 3);
    out.push_str(",\"target\":\"");
    out.push_str(TARGET);
    out.push_str("\"}\n");
}

/// The whole "order completed" line, newline included.
fn render_order_completed(
    out: &mut String,
    second: &mut u64,
    prefix: &mut String,
    now: std::time::Duration,
    order_id: &uuid::Uuid,
    attempts: u32,
) {
    open_line(out, second, prefix, now, "order completed");
    out.push_str(",\"attempts\":");
    push_digits(out, u64::from(attempts), 1);
    out.push_str(",\"target\":\"");
    out.push_str(JOB_TARGET);
    out.push_str("\",\"span\":{\"order_id\":\"");
    let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.push_str(order_id.hyphenated().encode_lower(&mut id));
    out.push_str("\",\"name\":\"job\"}}\n");
}

/// `n` in decimal, zero-padded to at least `width` digits (core::fmt's
/// machinery was a third of the line's cost).
fn push_digits(out: &mut String, mut n: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for _ in (digits.len() - i)..width {
        out.push('0');
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// `s` as a JSON string: quotes, backslashes and control characters escaped.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    // Ids, methods, paths and routes almost never need escaping: one pass
    // over the bytes decides.
    if !s
        .bytes()
        .any(|b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
    {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let escaped = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 || c == '\u{7f}' => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push_str(escaped);
        }
        start = i + c.len_utf8();
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(fields: &RequestLine<'_>, now: Duration) -> String {
        let (mut out, mut second, mut prefix) = (String::new(), u64::MAX, String::new());
        render(&mut out, &mut second, &mut prefix, now, fields);
        out
    }

    const FIELDS: RequestLine<'static> = RequestLine {
        request_id: "3f1c",
        method: "GET",
        path: "/orders/abc",
        route: "/orders/{id}",
        status: 200,
        latency_us: 76,
    };

    #[test]
    fn the_line_has_the_formatters_fields_in_its_order() {
        let at = Duration::from_micros(1_795_000_000_123_456);
        let text = line(&FIELDS, at);
        assert!(text.ends_with('\n'));
        assert_eq!(
            text,
            "{\"timestamp\":\"2026-11-18T11:06:40.123456Z\",\"level\":\"INFO\",\"message\":\"request\",\
             \"request_id\":\"3f1c\",\"method\":\"GET\",\"path\":\"/orders/abc\",\"route\":\"/orders/{id}\",\
             \"status\":200,\"latency_ms\":0.076,\"target\":\"reliability_lab::http\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["latency_ms"], 0.076);
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 10, "{keys:?}");
    }

    fn keys(v: &serde_json::Value) -> Vec<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    /// What tracing-subscriber's JSON formatter, set up as `logging::init`
    /// sets it up, writes for the same request.
    fn formatter_line(f: &RequestLine<'_>) -> serde_json::Value {
        formatter_output(|| {
            tracing::info!(
                target: "reliability_lab::http",
                request_id = f.request_id,
                method = f.method,
                path = f.path,
                route = f.route,
                status = f.status,
                latency_ms = f.latency_us as f64 / 1000.0,
                "request"
            );
        })
    }

    /// The one line the formatter, set up as `logging::init` sets it up,
    /// writes for what `log` logs.
    fn formatter_output(log: impl FnOnce()) -> serde_json::Value {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_target(true)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        serde_json::from_str(text.trim()).unwrap()
    }

    #[test]
    fn the_line_matches_what_the_json_formatter_wrote_key_for_key() {
        let ours: serde_json::Value =
            serde_json::from_str(&line(&FIELDS, Duration::from_secs(1))).unwrap();
        let theirs = formatter_line(&FIELDS);
        assert_eq!(keys(&ours), keys(&theirs));
        for key in keys(&theirs).iter().filter(|k| *k != "timestamp") {
            assert_eq!(ours[key], theirs[key], "{key}");
        }
        let stamp = theirs["timestamp"].as_str().unwrap();
        assert_eq!(stamp.len(), "1970-01-01T00:00:01.000000Z".len(), "{stamp}");
    }

    #[test]
    fn the_order_line_matches_what_the_json_formatter_wrote_in_the_job_span() {
        let id = uuid::Uuid::from_u128(0x3f1c_0000_4000_8000_0000_0000_0000_00aa);
        let (mut text, mut second, mut prefix) = (String::new(), u64::MAX, String::new());
        render_order_completed(
            &mut text,
            &mut second,
            &mut prefix,
            Duration::from_micros(1_795_000_000_123_456),
            &id,
            3,
        );
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.starts_with("{\"timestamp\":\"2026-11-18T11:06:40.123456Z\","));
        let ours: serde_json::Value = serde_json::from_str(&text).unwrap();
        let theirs = formatter_output(|| {
            let span = tracing::info_span!("job", order_id = %id);
            let _in = span.enter();
            tracing::info!(target: JOB_TARGET, attempts = 3u32, "order completed");
        });
        assert_eq!(keys(&ours), keys(&theirs));
        for key in keys(&theirs).iter().filter(|k| *k != "timestamp") {
            assert_eq!(ours[key], theirs[key], "{key}");
        }
        assert_eq!(ours["span"]["order_id"], id.to_string());
    }

    #[test]
    fn every_string_is_escaped_so_the_line_stays_one_json_object() {
        let nasty = "a\"b\\c\nd\re\tf\u{1}g\u{7f}h\u{e9}";
        let fields = RequestLine {
            request_id: nasty,
            path: nasty,
            route: "\"",
            latency_us: 1_234_567,
            ..FIELDS
        };
        let text = line(&fields, Duration::from_secs(1));
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["request_id"], nasty);
        assert_eq!(v["path"], nasty);
        assert_eq!(v["route"], "\"");
        assert_eq!(v["latency_ms"], 1234.567);
    }

    /// Each character that needs escaping, alone in an otherwise plain
    /// string: the quick scan must send every one of them to the escaper.
    #[test]
    fn a_lone_character_that_needs_escaping_is_escaped() {
        for (raw, escaped) in [
            ("a\\b", r#""a\\b""#),
            ("a\"b", r#""a\"b""#),
            ("a\u{7f}b", r#""a\u007fb""#),
            ("a\u{1}b", r#""a\u0001b""#),
            ("a\nb", r#""a\nb""#),
        ] {
            let mut out = String::new();
            json_string(&mut out, raw);
            assert_eq!(out, escaped, "{raw:?}");
            let back: String = serde_json::from_str(&out).unwrap();
            assert_eq!(back, raw);
        }
    }

    #[test]
    fn digits_are_padded_to_their_width_and_never_cut() {
        for (n, width, text) in [
            (0, 1, "0"),
            (7, 3, "007"),
            (1234, 3, "1234"),
            (u64::MAX, 1, "18446744073709551615"),
            (5, 6, "000005"),
        ] {
            let mut out = String::new();
            push_digits(&mut out, n, width);
            assert_eq!(out, text);
        }
    }

    #[test]
    fn the_cached_date_moves_with_the_second() {
        let (mut out, mut second, mut prefix) = (String::new(), u64::MAX, String::new());
        render(
            &mut out,
            &mut second,
            &mut prefix,
            Duration::from_millis(59_999),
            &FIELDS,
        );
        assert!(out.contains("\"1970-01-01T00:00:59.999000Z\""), "{out}");
        out.clear();
        render(
            &mut out,
            &mut second,
            &mut prefix,
            Duration::from_millis(60_000),
            &FIELDS,
        );
        assert!(out.contains("\"1970-01-01T00:01:00.000000Z\""), "{out}");
    }
}
