//! Points in time as the key commands take them (`--at`, `--not-before`,
//! `--not-after`) and as they write them into the config: whole seconds, UTC, in the
//! TOML date-time form the validator reads (`2026-11-30T04:40:00Z`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;

/// Parses a time argument relative to `now`:
/// - `now`;
/// - `+DURATION` from now, e.g. `+2h`, `+7d` (humantime units);
/// - an RFC 3339 date-time with its offset, e.g. `2026-12-01T00:00:00Z` or
///   `2026-12-01T09:00:00+09:00`;
/// - a date, `2026-12-01`, meaning its midnight UTC.
///
/// A time without an offset is refused rather than guessed: a key's validity must not
/// depend on the time zone of the machine that ran the command.
pub fn parse(s: &str, now: SystemTime) -> Result<SystemTime, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Some(d) = s.strip_prefix('+') {
        let d = humantime::parse_duration(d.trim())
            .map_err(|e| format!("\"{s}\": {e}; write a duration after '+', e.g. +2h or +7d"))?;
        return Ok(now + d);
    }
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t.into());
    }
    let date_only = s.len() == 10 && !s.contains('T');
    if let Ok(t) = time::OffsetDateTime::parse(&format!("{s}T00:00:00Z"), &Rfc3339) {
        if date_only {
            return Ok(t.into());
        }
    }
    Err(format!(
        "\"{s}\" is not a time; write now, +DURATION (e.g. +2h), an RFC 3339 date-time with offset (e.g. 2026-12-01T00:00:00Z) or a date (2026-12-01, midnight UTC)"
    ))
}

/// For clap: [`parse`] against the clock.
pub fn parse_arg(s: &str) -> Result<SystemTime, String> {
    parse(s, SystemTime::now())
}

/// `t` rounded down to the second, as written into the config: rounding down means a
/// revocation "now" has taken effect by the time the file is written.
pub fn floor_second(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// `2026-11-30T04:40:00Z`: the form written into the config and printed.
pub fn format(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The TOML date-time value for `t` (rounded down to the second).
pub fn toml_value(t: SystemTime) -> toml_edit::Value {
    let d: toml_edit::Datetime = format(floor_second(t))
        .parse()
        .expect("RFC 3339 from humantime is a TOML date-time");
    toml_edit::Value::from(d)
}

/// A TOML date-time read back, when it is a full date-time with offset (the only form
/// the validator accepts for key windows).
pub fn from_toml(d: &toml_edit::Datetime) -> Option<SystemTime> {
    if d.date.is_none() || d.time.is_none() || d.offset.is_none() {
        return None;
    }
    time::OffsetDateTime::parse(&d.to_string(), &Rfc3339)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        time::OffsetDateTime::parse(s, &Rfc3339).unwrap().into()
    }

    #[test]
    fn every_documented_form_parses_and_offsets_are_honoured() {
        let now = at("2026-11-30T04:40:12.5Z");
        assert_eq!(parse("now", now), Ok(now));
        assert_eq!(parse("+2h", now), Ok(at("2026-11-30T06:40:12.5Z")));
        assert_eq!(parse("+7d", now), Ok(at("2026-12-07T04:40:12.5Z")));
        assert_eq!(
            parse("2026-12-01T09:00:00+09:00", now),
            Ok(at("2026-12-01T00:00:00Z"))
        );
        assert_eq!(parse("2026-12-01", now), Ok(at("2026-12-01T00:00:00Z")));
        for bad in [
            "2026-12-01T00:00:00",
            "tomorrow",
            "+2 fortnights",
            "",
            "12/01/2026",
        ] {
            let e = parse(bad, now).unwrap_err();
            assert!(e.contains("e.g."), "{bad}: {e}");
        }
    }

    #[test]
    fn written_times_are_whole_utc_seconds_that_read_back() {
        let t = at("2026-11-30T13:40:12.9+09:00");
        assert_eq!(format(floor_second(t)), "2026-11-30T04:40:12Z");
        let v = toml_value(t);
        assert_eq!(v.to_string().trim(), "2026-11-30T04:40:12Z");
        let d = v.as_datetime().unwrap();
        assert_eq!(from_toml(d), Some(floor_second(t)));
        assert_eq!(from_toml(&"2026-11-30".parse().unwrap()), None);
    }
}
