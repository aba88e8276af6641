//! Cron schedules: the standard 5 fields (`minute hour day-of-month month day-of-week`), or 6 with a leading
//! seconds field (the Quartz/Cronos extension), plus the macros `@yearly`, `@annually`, `@monthly`, `@weekly`,
//! `@daily`, `@midnight`, `@hourly`. Fields take `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b`,
//! and month (`JAN`–`DEC`) and weekday (`SUN`–`SAT`; 0 and 7 are Sunday) names. As in Vixie cron, when both
//! day-of-month and day-of-week are restricted, a day matching either runs.
//!
//! Times are evaluated in an IANA time zone (UTC by default). A local time skipped by a DST change runs later by the
//! gap's length (02:30 in a one-hour gap runs at 03:30, as the clock would have read without the change); a local
//! time that occurs twice runs once, at its first occurrence.
//!
//! Why not a crate: the maintained cron crates (`cron`, `croner`) compute on chrono, so a definition's `timeZone`
//! would be resolved by chrono-tz's compiled-in zone data while every other time here is jiff's, from the system's
//! tz database: two copies that can disagree about the same zone after a tz release. `jiff-cron`, the jiff port of
//! `cron`, is Quartz-shaped: a seconds field is required, days of week run 1–7 with Sunday 1, so the standard
//! `0 9 * * 1-5` does not parse, and `0 0 9 * * 1-5` runs Sunday to Thursday. What the recurring guarantees rest on is
//! exactly [`Schedule::next_after`] and [`Schedule::latest_between`], DST gaps and folds included, and those are
//! tested below.

use std::str::FromStr;

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A parsed schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    seconds: Field,
    minutes: Field,
    hours: Field,
    days: Field,
    months: Field,
    weekdays: Field,
    has_seconds: bool,
}

/// The allowed values of one field, as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Field {
    bits: u64,
    restricted: bool,
}

impl Field {
    fn has(&self, v: u8) -> bool {
        self.bits & (1 << v) != 0
    }
}

const MONTHS: [&str; 12] = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn parse_value(s: &str, min: u8, max: u8, names: &[&str], name_base: u8) -> Result<u8, String> {
    let upper = s.to_ascii_uppercase();
    if let Some(i) = names.iter().position(|n| *n == upper) {
        return Ok(i as u8 + name_base);
    }
    let v: u8 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v < min || v > max {
        return Err(format!("{v} is out of range {min}-{max}"));
    }
    Ok(v)
}

fn parse_field(text: &str, what: &str, min: u8, max: u8, names: &[&str], name_base: u8) -> Result<Field, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u8 = s.parse().map_err(|_| format!("{what}: step {s:?} is not a number"))?;
                if step == 0 {
                    return Err(format!("{what}: a step of 0 never advances"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let lo = parse_value(a, min, max, names, name_base).map_err(|e| format!("{what}: {e}"))?;
            let hi = parse_value(b, min, max, names, name_base).map_err(|e| format!("{what}: {e}"))?;
            if lo > hi {
                return Err(format!("{what}: range {range} runs backwards"));
            }
            (lo, hi)
        } else {
            let v = parse_value(range, min, max, names, name_base).map_err(|e| format!("{what}: {e}"))?;
            // `5/15` means "from 5, every 15".
            (v, if part.contains('/') { max } else { v })
        };
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v = match v.checked_add(step) {
                Some(n) => n,
                None => break,
            };
        }
    }
    Ok(Field { bits, restricted: text != "*" && text != "?" })
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expanded = match s.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other if other.starts_with('@') => return Err(format!("unknown macro {other:?}")),
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (sec, rest, has_seconds) = match fields.len() {
            5 => ("0", &fields[..], false),
            6 => (fields[0], &fields[1..], true),
            n => {
                return Err(format!(
                    "a schedule has 5 fields (minute hour day month weekday) or 6 with seconds first; got {n}"
                ));
            }
        };
        fn q(f: &str) -> &str {
            if f == "?" { "*" } else { f }
        }
        let mut weekdays = parse_field(q(rest[4]), "day of week", 0, 7, &WEEKDAYS, 0)?;
        if weekdays.has(7) {
            weekdays.bits |= 1; // 7 is Sunday too
        }
        Ok(Schedule {
            seconds: parse_field(sec, "second", 0, 59, &[], 0)?,
            minutes: parse_field(rest[0], "minute", 0, 59, &[], 0)?,
            hours: parse_field(rest[1], "hour", 0, 23, &[], 0)?,
            days: parse_field(q(rest[2]), "day of month", 1, 31, &[], 0)?,
            months: parse_field(rest[3], "month", 1, 12, &MONTHS, 1)?,
            weekdays,
            has_seconds,
        })
    }
}

impl Schedule {
    /// Whether the schedule has a seconds field (6 fields).
    #[cfg(test)]
    fn has_seconds(&self) -> bool {
        self.has_seconds
    }

    fn day_matches(&self, dt: DateTime) -> bool {
        let dom = self.days.has(dt.day() as u8);
        let dow = self.weekdays.has(dt.weekday().to_sunday_zero_offset() as u8);
        match (self.days.restricted, self.weekdays.restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first scheduled instant strictly after `after`, in time zone `tz`. `None` if there is none within
    /// about eight years (e.g. `0 0 30 2 *`).
    ///
    /// Local times are walked in order, and each maps to a later instant than the one before, except a local time in
    /// a DST gap: it runs the gap's length later, which may be after a real local time the walk reaches next (with
    /// a gap of other than an hour: Lord Howe's 30 minutes, Troll's two hours; `1,30 2 * * *` on a 02:00 → 02:30
    /// night runs 02:30 first, then the moved 02:01 at 02:31). So a tick moved by a gap is kept while the walk goes
    /// on up to the local time it moved to, and the earliest instant found is the answer.
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let start = walk_start(after, tz)?;
        let mut dt = start.with().subsec_nanosecond(0).build().ok()?.checked_add(1.second()).ok()?;
        let limit = start.checked_add(8.years()).ok()?;
        // A tick moved by a gap: its instant, and the local time it runs at.
        let mut moved: Option<(Timestamp, DateTime)> = None;
        while dt < limit {
            if let Some((ts, lands)) = moved
                && dt > lands
            {
                return Some(ts);
            }
            if !self.months.has(dt.month() as u8) {
                dt = dt.first_of_month().checked_add(1.month()).ok()?.start_of_day();
            } else if !self.day_matches(dt) {
                dt = dt.start_of_day().checked_add(1.day()).ok()?;
            } else if !self.hours.has(dt.hour() as u8) {
                dt = dt.with().minute(0).second(0).build().ok()?.checked_add(1.hour()).ok()?;
            } else if !self.minutes.has(dt.minute() as u8) {
                dt = dt.with().second(0).build().ok()?.checked_add(1.minute()).ok()?;
            } else if !self.seconds.has(dt.second() as u8) {
                dt = dt.checked_add(1.second()).ok()?;
            } else {
                let zoned = tz.to_ambiguous_zoned(dt).compatible().ok()?;
                let ts = zoned.timestamp();
                if ts > after {
                    if zoned.datetime() == dt {
                        return Some(moved.map_or(ts, |(earlier, _)| earlier.min(ts)));
                    }
                    if moved.is_none_or(|(earlier, _)| ts < earlier) {
                        moved = Some((ts, zoned.datetime()));
                    }
                }
                // The second occurrence of a repeated local time: already ran at the first.
                dt = dt.checked_add(1.second()).ok()?;
            }
        }
        moved.map(|(ts, _)| ts)
    }

    /// The latest scheduled instant in `(after, until]`, if any, in O(log(until − after)) calls of
    /// [`Schedule::next_after`] however many ticks the interval holds (a walk forward from `after` would take one
    /// step per tick: 172,800 for two days of `* * * * * *`).
    ///
    /// Binary search on "a tick follows `x` within `until`", which holds for every `x` before the latest tick and for
    /// none from it on. The result `t` satisfies `next_after(t) > until`: the forward walk finds nothing after it.
    pub fn latest_between(&self, after: Timestamp, until: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let due = |x: Timestamp| self.next_after(x, tz).filter(|n| *n <= until);
        // Invariants: `best` is a tick <= `until`; no tick follows `none_after` within `until`.
        let mut best = due(after)?;
        let mut none_after = until;
        loop {
            let gap = none_after.as_second() - best.as_second();
            if gap <= 0 {
                return Some(best);
            }
            // Ticks are whole seconds, so whole-second probes suffice; `mid` is `best` itself once the gap is 1 s.
            let mid = Timestamp::from_second(best.as_second() + gap / 2).ok()?;
            match due(mid) {
                Some(later) => best = later,
                None if mid == best => return Some(best),
                None => none_after = mid,
            }
        }
    }

    /// Every scheduled instant in `(after, until]`, at most `max` of them (the earliest first): the walk
    /// [`Schedule::latest_between`] is checked against.
    #[cfg(test)]
    fn between(&self, after: Timestamp, until: Timestamp, tz: &TimeZone, max: usize) -> Vec<Timestamp> {
        let mut out = Vec::new();
        let mut t = after;
        while out.len() < max {
            match self.next_after(t, tz) {
                Some(n) if n <= until => {
                    out.push(n);
                    t = n;
                }
                _ => break,
            }
        }
        out
    }
}

/// The local time [`Schedule::next_after`] walks from: `after` as the clock reads it, or, while ticks moved by the last
/// gap still run (up to the gap's length after it: local times in the gap run that much later), as the clock read
/// before that gap, so that the walk meets them although they read earlier than `after`.
fn walk_start(after: Timestamp, tz: &TimeZone) -> Option<DateTime> {
    let now = after.to_zoned(tz.clone()).datetime();
    let Some(last) = tz.preceding(after.checked_add(1.second()).ok()?).next() else { return Some(now) };
    let before = tz.to_offset(last.timestamp().checked_sub(1.second()).ok()?);
    let gap = i64::from(last.offset().seconds() - before.seconds());
    let moved_ticks_run = gap > 0 && after.as_second() < last.timestamp().as_second() + gap;
    Some(if moved_ticks_run { before.to_datetime(after) } else { now })
}

/// Resolve an IANA time zone name (`None`: UTC), from the system's zone database (`/usr/share/zoneinfo`), or the one
/// compiled in where there is none (a minimal image).
pub fn time_zone(name: Option<&str>) -> Result<TimeZone, String> {
    match name {
        None | Some("") | Some("UTC") | Some("Etc/UTC") => Ok(TimeZone::UTC),
        Some(n) => {
            TimeZone::get(n).map_err(|_| format!("unknown time zone {n:?}: use an IANA name such as Europe/Berlin"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(expr: &str, after: &str, tz: &str) -> String {
        let s: Schedule = expr.parse().unwrap();
        let tz = time_zone(Some(tz)).unwrap();
        s.next_after(ts(after), &tz).unwrap().to_zoned(tz).to_string()
    }

    #[test]
    fn every_minute_and_every_fifteen() {
        assert_eq!(next("* * * * *", "2026-01-01T10:00:30Z", "UTC"), "2026-01-01T10:01:00+00:00[UTC]");
        assert_eq!(next("*/15 * * * *", "2026-01-01T10:01:00Z", "UTC"), "2026-01-01T10:15:00+00:00[UTC]");
        assert_eq!(next("5/15 * * * *", "2026-01-01T10:21:00Z", "UTC"), "2026-01-01T10:35:00+00:00[UTC]");
    }

    #[test]
    fn a_tick_exactly_at_after_is_not_repeated() {
        assert_eq!(next("0 * * * *", "2026-01-01T10:00:00Z", "UTC"), "2026-01-01T11:00:00+00:00[UTC]");
    }

    #[test]
    fn names_ranges_lists_and_macros() {
        assert_eq!(next("30 9 * JAN-MAR MON,FRI", "2026-01-01T00:00:00Z", "UTC"), "2026-01-02T09:30:00+00:00[UTC]");
        assert_eq!(next("@monthly", "2026-01-15T00:00:00Z", "UTC"), "2026-02-01T00:00:00+00:00[UTC]");
        assert_eq!(next("0 0 * * 7", "2026-01-01T00:00:00Z", "UTC"), "2026-01-04T00:00:00+00:00[UTC]", "7 is Sunday");
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_are_restricted() {
        // The 13th, or any Friday: 2026-02-06 is a Friday before the 13th.
        assert_eq!(next("0 0 13 * FRI", "2026-02-01T00:00:00Z", "UTC"), "2026-02-06T00:00:00+00:00[UTC]");
    }

    #[test]
    fn six_fields_add_seconds() {
        let s: Schedule = "*/2 * * * * *".parse().unwrap();
        assert!(s.has_seconds());
        assert_eq!(next("*/2 * * * * *", "2026-01-01T10:00:01Z", "UTC"), "2026-01-01T10:00:02+00:00[UTC]");
    }

    #[test]
    fn schedules_follow_the_time_zone_across_dst() {
        assert_eq!(
            next("0 9 * * *", "2026-03-28T12:00:00Z", "Europe/Berlin"),
            "2026-03-29T09:00:00+02:00[Europe/Berlin]"
        );
        // 02:30 does not exist on 2026-03-29 in Berlin: it runs an hour later, the gap's length.
        assert_eq!(
            next("30 2 * * *", "2026-03-28T12:00:00Z", "Europe/Berlin"),
            "2026-03-29T03:30:00+02:00[Europe/Berlin]"
        );
        // 02:30 happens twice on 2026-10-25: it runs once.
        let s: Schedule = "30 2 * * *".parse().unwrap();
        let tz = time_zone(Some("Europe/Berlin")).unwrap();
        let runs = s.between(ts("2026-10-24T12:00:00Z"), ts("2026-10-25T12:00:00Z"), &tz, 10);
        assert_eq!(runs.len(), 1);
    }

    /// Every tick of `expr` in `(after, until]`, found without the walk: each local minute of the window that
    /// matches, mapped as a gap or fold maps it, in instant order, once each.
    fn every_tick_by_brute_force(expr: &str, after: Timestamp, until: Timestamp, tz: &TimeZone) -> Vec<Timestamp> {
        let s: Schedule = expr.parse().unwrap();
        let mut dt = after.to_zoned(tz.clone()).datetime().checked_sub(3.hours()).unwrap();
        let end = until.to_zoned(tz.clone()).datetime().checked_add(3.hours()).unwrap();
        let mut ticks = Vec::new();
        while dt <= end {
            let matches = s.months.has(dt.month() as u8)
                && s.day_matches(dt)
                && s.hours.has(dt.hour() as u8)
                && s.minutes.has(dt.minute() as u8)
                && s.seconds.has(dt.second() as u8);
            if matches {
                let t = tz.to_ambiguous_zoned(dt).compatible().unwrap().timestamp();
                if t > after && t <= until {
                    ticks.push(t);
                }
            }
            dt = dt.checked_add(1.minute()).unwrap();
        }
        ticks.sort();
        ticks.dedup();
        ticks
    }

    /// Lord Howe's DST gap is 30 minutes (02:00 → 02:30 on 2026-10-04) and Troll's two hours (01:00 → 03:00 on
    /// 2026-03-29). Before: with `1,30 2 * * *`, the walk found 02:01 first, moved to 02:31, and returned it,
    /// skipping the real 02:30 a minute earlier: that tick was never made.
    #[test]
    fn a_tick_moved_by_a_dst_gap_of_other_than_an_hour_does_not_hide_an_earlier_real_one() {
        assert_eq!(
            next("0 1,30 2 * * *", "2026-10-03T15:29:00Z", "Australia/Lord_Howe"),
            "2026-10-04T02:30:00+11:00[Australia/Lord_Howe]"
        );
        assert_eq!(
            next("0 1,30 2 * * *", "2026-10-03T15:30:00Z", "Australia/Lord_Howe"),
            "2026-10-04T02:31:00+11:00[Australia/Lord_Howe]"
        );
        let cases = [
            ("Australia/Lord_Howe", "2026-10-03T12:00:00Z", "2026-10-03T19:00:00Z"),
            ("Antarctica/Troll", "2026-03-28T22:00:00Z", "2026-03-29T05:00:00Z"),
            ("Europe/Berlin", "2026-03-28T22:00:00Z", "2026-03-29T05:00:00Z"),
            ("Australia/Lord_Howe", "2026-04-04T12:00:00Z", "2026-04-04T19:00:00Z"),
        ];
        for (zone, after, until) in cases {
            let tz = time_zone(Some(zone)).unwrap();
            for expr in ["0 1,30 2 * * *", "15,40 2 * * *", "*/7 1-3 * * *", "0 0,45 1,3 * * *", "59 1 * * *"] {
                let s: Schedule = expr.parse().unwrap();
                let walked = s.between(ts(after), ts(until), &tz, 10_000);
                let expected = every_tick_by_brute_force(expr, ts(after), ts(until), &tz);
                assert_eq!(walked, expected, "{expr} in {zone}");
                assert_eq!(s.latest_between(ts(after), ts(until), &tz), expected.last().copied(), "{expr} in {zone}");
            }
        }
    }

    #[test]
    fn impossible_dates_have_no_next_run() {
        let s: Schedule = "0 0 30 2 *".parse().unwrap();
        assert_eq!(s.next_after(ts("2026-01-01T00:00:00Z"), &TimeZone::UTC), None);
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        let err = |e: &str| e.parse::<Schedule>().unwrap_err();
        assert!(err("* * *").contains("5 fields"));
        assert!(err("61 * * * *").contains("minute: 61 is out of range 0-59"));
        assert!(err("* * * FOO *").contains("month"));
        assert!(err("*/0 * * * *").contains("step of 0"));
        assert!(err("@sometimes").contains("unknown macro"));
        assert!(time_zone(Some("Mars/Olympus")).unwrap_err().contains("unknown time zone"));
    }

    #[test]
    fn the_latest_tick_of_two_days_of_seconds_is_found_directly() {
        let s: Schedule = "* * * * * *".parse().unwrap();
        let now = ts("2026-01-03T10:00:00.700Z");
        let latest = s.latest_between(ts("2026-01-01T10:00:00Z"), now, &TimeZone::UTC);
        assert_eq!(latest, Some(ts("2026-01-03T10:00:00Z")));
    }

    #[test]
    fn the_latest_tick_agrees_with_walking_every_tick_forward() {
        let cases = [
            ("*/7 * * * * *", "2026-01-01T10:00:00Z", "2026-01-01T10:03:00Z", "UTC"),
            ("0 9 * * MON-FRI", "2026-01-01T00:00:00Z", "2026-03-01T12:00:00Z", "UTC"),
            ("30 2 * * *", "2026-03-20T00:00:00Z", "2026-03-29T02:00:00Z", "Europe/Berlin"),
            ("30 2 * * *", "2026-10-20T00:00:00Z", "2026-10-25T01:45:00Z", "Europe/Berlin"),
            ("* * * * * *", "2026-10-25T00:59:00Z", "2026-10-25T01:10:00Z", "Europe/Berlin"),
            ("0 0 1 1 *", "2020-06-01T00:00:00Z", "2026-06-01T00:00:00Z", "UTC"),
        ];
        for (expr, after, until, tz) in cases {
            let s: Schedule = expr.parse().unwrap();
            let tz = time_zone(Some(tz)).unwrap();
            let walked = s.between(ts(after), ts(until), &tz, 1_000_000).last().copied();
            assert_eq!(s.latest_between(ts(after), ts(until), &tz), walked, "{expr} in ({after}, {until}]");
        }
    }

    #[test]
    fn the_latest_tick_agrees_with_walking_forward_over_many_windows_across_dst_changes() {
        let tz = time_zone(Some("Europe/Berlin")).unwrap();
        let starts = [ts("2026-03-28T22:00:00Z").as_second(), ts("2026-10-24T22:00:00Z").as_second()];
        for (expr, start) in ["*/13 * * * * *", "0,30 * * * *", "15 2 * * *", "*/7 1-3 * * *"]
            .into_iter()
            .flat_map(|e| starts.map(|s| (e, s)))
        {
            let s: Schedule = expr.parse().unwrap();
            // Windows of many lengths up to six hours, starting every 97 minutes across the change.
            for i in 0..20 {
                let after = Timestamp::from_second(start + i * 97 * 60).unwrap();
                let until = Timestamp::from_second(after.as_second() + (i * 1103) % 21_600).unwrap();
                let walked = s.between(after, until, &tz, 1_000_000).last().copied();
                assert_eq!(s.latest_between(after, until, &tz), walked, "{expr} in ({after}, {until}]");
            }
        }
    }

    #[test]
    fn no_latest_tick_when_none_is_due() {
        let s: Schedule = "0 * * * *".parse().unwrap();
        let from = ts("2026-01-01T10:00:00Z");
        assert_eq!(s.latest_between(from, ts("2026-01-01T10:59:59Z"), &TimeZone::UTC), None);
        assert_eq!(s.latest_between(from, from, &TimeZone::UTC), None);
        assert_eq!(
            s.latest_between(from, ts("2026-01-01T11:00:00Z"), &TimeZone::UTC),
            Some(ts("2026-01-01T11:00:00Z"))
        );
    }

    #[test]
    fn between_lists_missed_ticks_in_order() {
        let s: Schedule = "*/10 * * * *".parse().unwrap();
        let runs = s.between(ts("2026-01-01T10:00:00Z"), ts("2026-01-01T10:35:00Z"), &TimeZone::UTC, 100);
        assert_eq!(runs, [ts("2026-01-01T10:10:00Z"), ts("2026-01-01T10:20:00Z"), ts("2026-01-01T10:30:00Z")]);
    }
}
