//! The cluster's clock: the apiserver's, as this replica estimates it.
//!
//! Schedules (recurring ticks, delays, backoffs, TTLs, job deadlines) are times written into objects and compared
//! by every replica. A replica whose clock runs ahead would start a tick or a delayed job early, one behind would
//! start it late, and replicas that disagree could each decide a different tick is due. So every such decision
//! reads this clock, which follows the apiserver's (its `Date` header) and not the machine's: replicas then agree
//! to within a few seconds ([`REPLICAS_AGREE_WITHIN`]) whatever their own clocks say. Lease expiry needs no clock at
//! all (see `lease`).
//!
//! That bound holds only once a reading was taken: until then [`ServerClock::now`] is this machine's clock, however
//! wrong, so the operator acts on nothing before a first reading ([`ServerClock::measured`]). A reading is taken
//! when what it can be off by fits the bound ([`read`]): always for answers within [`MAX_ROUND_TRIP`], and for
//! slower ones (a remote apiserver) while the header's half second and half the round trip still fit. Between
//! readings the time counts on from the last one by this machine's monotonic clock, so setting its wall clock
//! changes nothing. A paused virtual machine is the exception the monotonic clock cannot see: it does not count the
//! pause, and the estimate would stay behind (late, never early) until the next reading. Once the machine's wall
//! clock is put right after such a pause it runs ahead of the monotonic one, and a reading is taken then
//! ([`wall_jumped`]). Only a reading moves the estimate: a wall clock set ahead by hand costs one reading.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use kube::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the offset is measured again.
const SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// How often, between readings, this machine's wall clock is compared with its monotonic clock ([`wall_jumped`]).
const WATCH_WALL_EVERY: Duration = Duration::from_secs(1);
/// How far the wall clock may run ahead of the monotonic clock between two comparisons before a reading is taken at
/// once: far above what NTP's slewing can do in [`WATCH_WALL_EVERY`] (0.5 ms at its largest correction), far below
/// the seconds a paused machine misses.
const WALL_JUMP: SignedDuration = SignedDuration::from_millis(500);
/// How often a reading is tried before the first one is taken.
const RETRY_FIRST: Duration = Duration::from_secs(2);
/// Offsets within this are below what a whole-second `Date` header can show: ignored when a reading is precise
/// enough to afford it ([`read`]).
const RESOLUTION: SignedDuration = SignedDuration::from_millis(1_500);
/// A round trip within which a reading is always taken: the bound below is built on it.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(500);
/// The middle of the whole second a `Date` header names: how far it is from either end.
const HALF_A_HEADER_SECOND: SignedDuration = SignedDuration::from_millis(500);

/// How far apart two replicas' estimates of the cluster's clock may be: 4.5 s, twice what a fast reading may be off
/// by (the `Date` header's half second, its middle being taken, plus half of at most [`MAX_ROUND_TRIP`], plus
/// [`RESOLUTION`] when the offset is ignored). A reading is taken only within half of it less [`SLACK`] ([`read`]),
/// whatever its round trip. Two replicas may be off in opposite directions. Decisions that one replica makes on
/// another's behalf in time must leave this much room.
pub const REPLICAS_AGREE_WITHIN: Duration = Duration::from_millis(
    2 * (RESOLUTION.as_millis() as u64
        + HALF_A_HEADER_SECOND.as_millis() as u64
        + MAX_ROUND_TRIP.as_millis() as u64 / 2),
);
/// Room kept from the bound for what [`read`]'s reckoning leaves out: milliseconds lost to rounding, the instants
/// between reading this machine's two clocks, and its monotonic clock's drift between readings (15 ms in 30 s at
/// NTP's largest correction, 500 ppm).
const SLACK: Duration = Duration::from_millis(50);
/// The most one replica's reading may be off: half of what two may disagree by, less [`SLACK`].
const MOST_OFF: Duration = Duration::from_millis((REPLICAS_AGREE_WITHIN.as_millis() / 2 - SLACK.as_millis()) as u64);
/// The slowest answer whose reading can still fit [`MOST_OFF`] (3.4 s): a request is not waited for longer.
const SLOWEST_USEFUL: Duration =
    Duration::from_millis(2 * (MOST_OFF.as_millis() as u64 - HALF_A_HEADER_SECOND.as_millis() as u64));

/// This replica's estimate of the apiserver's clock.
#[derive(Debug)]
pub struct ServerClock {
    /// The apiserver's time at an instant of this machine's monotonic clock, from the last reading taken.
    anchor: Mutex<Option<(Instant, Timestamp)>>,
    /// Whether a reading was taken: [`ServerClock::now`] is then within [`MOST_OFF`] of the apiserver's clock.
    measured: watch::Sender<bool>,
}

impl Default for ServerClock {
    fn default() -> Self {
        ServerClock { anchor: Mutex::new(None), measured: watch::Sender::new(false) }
    }
}

/// What one attempt to read the apiserver's clock gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Taken: the apiserver's clock is this far ahead of this machine's.
    Taken(SignedDuration),
    /// Discarded: the answer took this long, too long to say when it was stamped.
    Slow(Duration),
    /// Discarded: the answer had no readable `Date` header.
    Undated,
}

impl ServerClock {
    /// The cluster's time now: the last reading's, counted on by this machine's monotonic clock; this machine's
    /// wall clock before the first.
    pub fn now(&self) -> Timestamp {
        self.at(Instant::now())
    }

    /// The cluster's time at `instant`, as [`ServerClock::now`] would give it then.
    fn at(&self, instant: Instant) -> Timestamp {
        let Some((read_at, server)) = *self.anchor.lock().unwrap() else { return Timestamp::now() };
        let since = SignedDuration::try_from(instant.saturating_duration_since(read_at)).unwrap_or_default();
        server.checked_add(since).unwrap_or(Timestamp::MAX)
    }

    /// Count the cluster's time from `server` at `instant`.
    fn anchor(&self, instant: Instant, server: Timestamp) {
        *self.anchor.lock().unwrap() = Some((instant, server));
    }

    /// Whether a reading was taken yet ([`ServerClock::now`] is this machine's clock until then).
    pub fn is_measured(&self) -> bool {
        *self.measured.borrow()
    }

    /// Returns once a reading was taken.
    pub async fn measured(&self) {
        let mut rx = self.measured.subscribe();
        let _ = rx.wait_for(|m| *m).await;
    }

    /// Measure the offset once: a request's `Date` header against the middle of its round trip ([`read`]). A reading
    /// that could be off by more than the bound allows is discarded and the last estimate kept.
    /// `tell`: log the reading whether or not it moved the estimate.
    pub async fn sample(&self, client: &Client, tell: bool) -> crate::Result<Reading> {
        let request = http::Request::get("/version")
            .body(kube::client::Body::empty())
            .map_err(|e| crate::Error::Config(e.to_string()))?;
        let (sent_wall, sent) = (Timestamp::now(), Instant::now());
        let response = crate::client::bounded(SLOWEST_USEFUL, async { Ok(client.send(request).await?) }).await?;
        let round_trip = sent.elapsed();
        let date = response
            .headers()
            .get(http::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| jiff::fmt::rfc2822::parse(d).ok())
            .map(|z| z.timestamp());
        // Read to its end, so that the connection can carry the next request; a stalled body is not waited for.
        let _ = tokio::time::timeout(SLOWEST_USEFUL, http_body_util::BodyExt::collect(response.into_body())).await;
        let Some(date) = date else { return Ok(Reading::Undated) };
        let reading = read(date, sent_wall, round_trip);
        let Reading::Taken(offset) = reading else { return Ok(reading) };
        let middle = sent + round_trip / 2;
        let server = (sent_wall + SignedDuration::try_from(round_trip / 2).unwrap_or_default()) + offset;
        let moved = server.duration_since(self.at(middle));
        let first = self.anchor.lock().unwrap().is_none();
        self.anchor(middle, server);
        self.measured.send_replace(true);
        if first || tell || moved.abs() > SignedDuration::from_secs(1) {
            info!(
                offset_ms = offset.as_millis() as i64,
                moved_ms = moved.as_millis() as i64,
                "read the apiserver's clock; schedules follow it"
            );
        }
        Ok(reading)
    }

    /// Take readings until `stop`: every 30 s, at once when the wall clock jumped ahead of the monotonic one (a paused
    /// machine whose clock was put right: [`wall_jumped`]), and before the first is taken from [`RETRY_FIRST`] apart,
    /// twice as far each time, up to that. A reading that could not be taken is logged as a warning while none was,
    /// since work waits for it, and quietly after.
    pub async fn follow(&self, client: Client, stop: CancellationToken) {
        let mut retry = RETRY_FIRST;
        let mut jumped = false;
        loop {
            let measured = self.is_measured();
            // Looked at before the sample: a jump while it is under way (up to a few seconds) asks for another.
            let before = (Instant::now(), Timestamp::now());
            match self.sample(&client, jumped).await {
                Ok(Reading::Taken(_)) => {}
                Ok(discarded) if !measured => {
                    warn!(reading = ?discarded, "could not read the apiserver's clock yet; this replica waits for it")
                }
                Ok(discarded) => debug!(reading = ?discarded, "discarded a reading of the apiserver's clock"),
                Err(e) if !measured => {
                    warn!(error = %e, "could not read the apiserver's clock yet; this replica waits for it")
                }
                Err(e) => warn!(error = %e, "could not read the apiserver's clock; keeping the last estimate"),
            }
            let every = if self.is_measured() { SAMPLE_EVERY } else { retry };
            retry = (retry * 2).min(SAMPLE_EVERY);
            match until_next_reading(every, before, &stop).await {
                Some(jump) => jumped = jump,
                None => return,
            }
        }
    }
}

/// Wait `every`, looking at this machine's two clocks each [`WATCH_WALL_EVERY`], first against `last`: Some(true) as
/// soon as the wall clock jumped ahead ([`wall_jumped`]), Some(false) after `every`, None once `stop` is cancelled.
async fn until_next_reading(every: Duration, mut last: (Instant, Timestamp), stop: &CancellationToken) -> Option<bool> {
    let next = Instant::now() + every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_WALL_EVERY.min(next.saturating_duration_since(last.0))) => {}
            _ = stop.cancelled() => return None,
        }
        let now = (Instant::now(), Timestamp::now());
        if let Some(ahead) = wall_jumped(last, now) {
            info!(
                ahead_ms = ahead.as_millis() as i64,
                "this machine's wall clock jumped ahead of its monotonic clock (a paused machine?): reading the \
                 apiserver's clock again"
            );
            return Some(true);
        }
        if now.0 >= next {
            return Some(false);
        }
        last = now;
    }
}

/// How far this machine's wall clock ran ahead of its monotonic clock between two looks at both, if more than
/// [`WALL_JUMP`]: what a paused virtual machine shows once its wall clock is put right (its monotonic clock does not
/// count the pause). A wall clock set back, or slewed by NTP, is not a jump.
fn wall_jumped(before: (Instant, Timestamp), after: (Instant, Timestamp)) -> Option<SignedDuration> {
    let monotonic = SignedDuration::try_from(after.0.saturating_duration_since(before.0)).ok()?;
    let wall = after.1.duration_since(before.1);
    let ahead = wall.checked_sub(monotonic)?;
    (ahead > WALL_JUMP).then_some(ahead)
}

/// What a `Date` header (whole seconds, truncated) read over a round trip of `round_trip` sent at `sent` (this
/// machine's clock) says of the apiserver's clock. The server stamped it somewhere within the trip, at a time within
/// the second the header names: its middle against the trip's middle is off by at most half a second plus half the
/// trip. An offset within [`RESOLUTION`] is taken as zero, and a reading taken only if what it may be off by, so
/// rounded, stays within [`MOST_OFF`].
pub fn read(date: Timestamp, sent: Timestamp, round_trip: Duration) -> Reading {
    let half_trip = SignedDuration::try_from(round_trip / 2).unwrap_or(SignedDuration::MAX);
    let estimate = (date + HALF_A_HEADER_SECOND).duration_since(sent.checked_add(half_trip).unwrap_or(Timestamp::MAX));
    let uncertain = HALF_A_HEADER_SECOND.saturating_add(half_trip);
    let most_off = SignedDuration::try_from(MOST_OFF).unwrap_or(SignedDuration::MAX);
    if estimate.abs() <= RESOLUTION && estimate.abs().saturating_add(uncertain) <= most_off {
        Reading::Taken(SignedDuration::ZERO)
    } else if uncertain <= most_off {
        Reading::Taken(estimate)
    } else {
        Reading::Slow(round_trip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(ms).unwrap()
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn a_clock_within_the_headers_resolution_is_taken_as_right() {
        assert_eq!(read(at(100_000), at(100_900), ms(0)), Reading::Taken(SignedDuration::ZERO));
        assert_eq!(read(at(100_000), at(99_200), ms(0)), Reading::Taken(SignedDuration::ZERO));
    }

    #[test]
    fn a_clock_twenty_seconds_ahead_is_measured_as_such() {
        // The server says 100 s; here it is 120.3 s at the middle of the trip.
        assert_eq!(read(at(100_000), at(120_200), ms(200)), Reading::Taken(SignedDuration::from_millis(-19_800)));
    }

    #[test]
    fn a_slow_answer_is_read_while_what_it_may_be_off_by_fits_and_discarded_after() {
        // A right clock behind a 2 s round trip (a remote apiserver): read. 4 s: the stamp could be anywhere in it.
        assert_eq!(read(at(100_000), at(99_500), ms(2_000)), Reading::Taken(SignedDuration::ZERO));
        assert_eq!(read(at(100_000), at(79_500), ms(2_000)), Reading::Taken(SignedDuration::from_secs(20)));
        assert_eq!(read(at(100_000), at(98_500), ms(4_000)), Reading::Slow(ms(4_000)));
        // An offset within the resolution is applied, not ignored, when ignoring it would be off by too much.
        assert_eq!(read(at(100_000), at(98_400), ms(3_000)), Reading::Taken(SignedDuration::from_millis(600)));
    }

    #[test]
    fn a_reading_taken_is_never_off_by_more_than_half_what_two_replicas_may_disagree_by() {
        // A replica whose clock is `off` ms behind the apiserver's (negative: ahead) reads a `Date` header stamped at
        // server time `stamp`, somewhere within its round trip: every reading taken is within MOST_OFF of the truth,
        // every answer within MAX_ROUND_TRIP is taken, and none slower than SLOWEST_USEFUL.
        let most = MOST_OFF.as_millis() as i64;
        let (mut worst, mut worst_fast) = (0, 0);
        for trip in [0, 100, 250, 500, 1_000, 2_000, 3_000, 3_400, 3_500, 6_000] {
            for off in (-6_000..=6_000).step_by(37) {
                for stamp in (100_000..101_000).step_by(50) {
                    for into_trip in [0, trip / 2, trip] {
                        let date = at(stamp - stamp % 1_000);
                        let sent = at(stamp - off - into_trip as i64);
                        match read(date, sent, ms(trip)) {
                            Reading::Taken(estimate) => {
                                let error = (estimate.as_millis() as i64 - off).abs();
                                assert!(error <= most, "{trip} ms trip, {off} ms off: read {error} ms off");
                                worst = worst.max(error);
                                if ms(trip) <= MAX_ROUND_TRIP {
                                    worst_fast = worst_fast.max(error);
                                }
                            }
                            other => assert!(ms(trip) > MAX_ROUND_TRIP, "{trip} ms trip, {off} ms off: {other:?}"),
                        }
                        if ms(trip) > SLOWEST_USEFUL {
                            assert_eq!(read(date, sent, ms(trip)), Reading::Slow(ms(trip)));
                        }
                    }
                }
            }
        }
        assert!(worst_fast > most - 100, "the bound is not loose for fast answers: {worst_fast} ms of {most} ms");
        assert!(worst <= most);
        assert_eq!(SLOWEST_USEFUL, ms(3_400));
    }

    #[test]
    fn between_readings_the_time_counts_on_from_the_last_one_whatever_the_wall_clock_says() {
        let clock = ServerClock::default();
        let read_at = Instant::now();
        let server = at(1_000_000_000);
        clock.anchor(read_at, server);
        assert_eq!(clock.at(read_at + ms(1_500)), at(1_000_001_500));
        assert_eq!(clock.at(read_at), server);
        // An instant before the reading (a decision that began before it) counts as the reading's.
        if let Some(before) = read_at.checked_sub(ms(10)) {
            assert_eq!(clock.at(before), server);
        }
        assert!(clock.now() >= server && clock.now() < at(1_000_060_000), "counted from the reading, not the wall");
    }

    #[test]
    fn a_wall_clock_put_right_after_a_pause_the_monotonic_clock_missed_asks_for_a_reading() {
        let (t0, w0) = (Instant::now(), at(1_000_000_000));
        // A second on both clocks, or NTP slewing at its largest correction: nothing to do.
        assert_eq!(wall_jumped((t0, w0), (t0 + ms(1_000), at(1_000_001_000))), None);
        assert_eq!(wall_jumped((t0, w0), (t0 + ms(1_000), at(1_000_001_001))), None);
        // A wall clock set back, or a look delayed on a busy machine (both clocks counted the delay): nothing.
        assert_eq!(wall_jumped((t0, w0), (t0 + ms(1_000), at(999_990_000))), None);
        assert_eq!(wall_jumped((t0, w0), (t0 + ms(40_000), at(1_000_040_000))), None);
        // 37 s of pause the monotonic clock did not count, shown once the wall clock was put right.
        assert_eq!(wall_jumped((t0, w0), (t0 + ms(1_000), at(1_000_038_000))), Some(SignedDuration::from_secs(37)));
        // Just past the threshold, and just within it.
        assert_eq!(wall_jumped((t0, w0), (t0 + ms(1_000), at(1_000_001_501))), Some(SignedDuration::from_millis(501)));
        assert_eq!(wall_jumped((t0, w0), (t0 + ms(1_000), at(1_000_001_500))), None);
    }

    #[test]
    fn http_dates_parse() {
        let z = jiff::fmt::rfc2822::parse("Mon, 30 Nov 2026 12:21:49 GMT").unwrap();
        assert_eq!(z.timestamp(), "2026-11-30T12:21:49Z".parse::<Timestamp>().unwrap());
    }
}
