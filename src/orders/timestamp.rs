//! Orders' timestamps as JSON, written by hand.
//!
//! The text is exactly what chrono's serde support writes for a
//! `DateTime<Utc>` (RFC 3339, `Z`, the shortest of no fraction, 3, 6 or 9
//! digits that holds the value): a test compares the two. chrono gets there
//! through `core::fmt`, which under `GET /orders/{id}` load was 3.7% of the
//! service's CPU for the two timestamps of each answer; this is a few
//! divisions into a stack buffer. Years outside 0–9999 and leap seconds go
//! to chrono.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serializer;

/// `#[serde(serialize_with = "timestamp::serialize")]` for a `DateTime<Utc>`.
pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 30];
    match render(at, &mut buf) {
        Some(len) => {
            // Only ASCII digits and separators were written.
            let text = std::str::from_utf8(&buf[..len]).expect("ASCII");
            serializer.serialize_str(text)
        }
        None => serde::Serialize::serialize(at, serializer),
    }
}

/// Writes `at` into `buf`; `None` when chrono must do it.
fn render(at: &DateTime<Utc>, buf: &mut [u8; 30]) -> Option<usize> {
    let year = u32::try_from(at.year()).ok().filter(|y| *y <= 9999)?;
    let nanos = at.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    digits(&mut buf[0..4], year);
    buf[4] = b'-';
    digits(&mut buf[5..7], at.month());
    buf[7] = b'-';
    digits(&mut buf[8..10], at.day());
    buf[10] = b'T';
    digits(&mut buf[11..13], at.hour());
    buf[13] = b':';
    digits(&mut buf[14..16], at.minute());
    buf[16] = b':';
    digits(&mut buf[17..19], at.second());
    let mut len = 19;
    let (fraction, width) = if nanos == 0 {
        (0, 0)
    } else if nanos.is_multiple_of(1_000_000) {
        (nanos / 1_000_000, 3)
    } else if nanos.is_multiple_of(1_000) {
        (nanos / 1_000, 6)
    } else {
        (nanos, 9)
    };
    if width > 0 {
        buf[len] = b'.';
        digits(&mut buf[len + 1..len + 1 + width], fraction);
        len += 1 + width;
    }
    buf[len] = b'Z';
    Some(len + 1)
}

/// `value` in decimal, zero-padded to fill `out`.
fn digits(out: &mut [u8], mut value: u32) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use rand::{RngExt, SeedableRng};

    #[derive(serde::Serialize)]
    struct Ours(#[serde(serialize_with = "super::serialize")] chrono::DateTime<chrono::Utc>);

    fn both(at: chrono::DateTime<chrono::Utc>) -> (String, String) {
        (
            serde_json::to_string(&Ours(at)).unwrap(),
            serde_json::to_string(&at).unwrap(),
        )
    }

    #[test]
    fn the_text_is_chronos_for_every_precision() {
        let base = chrono::Utc.with_ymd_and_hms(2026, 11, 28, 9, 5, 7).unwrap();
        for nanos in [
            0,
            1,
            9,
            10,
            999,
            1_000,
            7_000,
            123_456_000,
            120_000_000,
            100_000_000,
            5_000_000,
            999_999_999,
            123_456_789,
            1_001_000,
        ] {
            let at = base + chrono::Duration::nanoseconds(nanos);
            let (ours, chronos) = both(at);
            assert_eq!(ours, chronos, "{nanos} ns");
        }
        assert_eq!(both(base).0, "\"2026-11-28T09:05:07Z\"");
    }

    #[test]
    fn the_text_is_chronos_across_the_calendar() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        for _ in 0..20_000 {
            // Year 0 to 9999, any nanosecond; every tenth value cut to µs as stored.
            let secs = rng.random_range(-62_167_219_200i64..253_402_300_799);
            let nanos = match rng.random_range(0..4) {
                0 => 0,
                1 => rng.random_range(0..1000) * 1_000_000,
                2 => rng.random_range(0..1_000_000) * 1_000,
                _ => rng.random_range(0..1_000_000_000),
            };
            let at = chrono::DateTime::from_timestamp(secs, nanos).unwrap();
            let (ours, chronos) = both(at);
            assert_eq!(ours, chronos, "{secs} s {nanos} ns");
        }
    }

    #[test]
    fn years_past_four_digits_and_leap_seconds_go_to_chrono() {
        let far = chrono::Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap();
        let early = chrono::Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap();
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        for at in [far, early, leap] {
            let (ours, chronos) = both(at);
            assert_eq!(ours, chronos);
        }
    }
}
