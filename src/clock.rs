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
//! wrong. Work that relies on the bound (the recurring controller) waits for [`ServerClock::measured`]; readings are
//! retried sooner until one is taken ([`ServerClock::follow`]).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use kube::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the offset is measured again.
const SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// How often a reading is tried before the first one is taken.
pub const RETRY_FIRST: Duration = Duration::from_secs(2);
/// Offsets within this are below what a whole-second `Date` header can show: ignored.
const RESOLUTION: SignedDuration = SignedDuration::from_millis(1_500);
/// A sample whose round trip took longer than this says little about when the server stamped its answer (a request
/// held on the way in looks like a server clock running ahead): discarded.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(500);

/// How far apart two replicas' estimates of the cluster's clock may be. Each estimate is within the `Date` header's
/// half second (its middle is taken) plus half of at most [`MAX_ROUND_TRIP`] of the apiserver's clock when an offset
/// is applied, and within [`RESOLUTION`] plus that when it is not: 2.25 s. Two replicas may be off in opposite
/// directions. Decisions that one replica makes on another's behalf in time must leave this much room.
pub const REPLICAS_AGREE_WITHIN: Duration = Duration::from_millis(
    2 * (RESOLUTION.as_millis() as u64
        + HALF_A_HEADER_SECOND.as_millis() as u64
        + MAX_ROUND_TRIP.as_millis() as u64 / 2),
);
/// The middle of the whole second a `Date` header names: how far it is from either end.
const HALF_A_HEADER_SECOND: SignedDuration = SignedDuration::from_millis(500);

/// This replica's estimate of the apiserver's clock.
#[derive(Debug)]
pub struct ServerClock {
    offset_ms: AtomicI64,
    /// Whether a reading was taken: the offset is then an estimate, within half of [`REPLICAS_AGREE_WITHIN`].
    measured: watch::Sender<bool>,
}

impl Default for ServerClock {
    fn default() -> Self {
        ServerClock { offset_ms: AtomicI64::new(0), measured: watch::Sender::new(false) }
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
    /// The cluster's time now.
    pub fn now(&self) -> Timestamp {
        let offset = SignedDuration::from_millis(self.offset_ms.load(Ordering::Relaxed));
        Timestamp::now().checked_add(offset).unwrap_or_else(|_| Timestamp::now())
    }

    /// How far the apiserver's clock is ahead of this machine's (negative: behind), as last measured.
    pub fn offset(&self) -> SignedDuration {
        SignedDuration::from_millis(self.offset_ms.load(Ordering::Relaxed))
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

    /// Measure the offset once: a request's `Date` header against the middle of its round trip. A slow or undated
    /// answer is discarded and the last estimate kept.
    pub async fn sample(&self, client: &Client) -> crate::Result<Reading> {
        let request = http::Request::get("/version")
            .body(kube::client::Body::empty())
            .map_err(|e| crate::Error::Config(e.to_string()))?;
        let (sent_wall, sent) = (Timestamp::now(), Instant::now());
        let response = crate::client::bounded(MAX_ROUND_TRIP * 4, async { Ok(client.send(request).await?) }).await?;
        let round_trip = sent.elapsed();
        if round_trip > MAX_ROUND_TRIP {
            return Ok(Reading::Slow(round_trip));
        }
        let date = response
            .headers()
            .get(http::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| jiff::fmt::rfc2822::parse(d).ok())
            .map(|z| z.timestamp());
        let Some(date) = date else { return Ok(Reading::Undated) };
        let midpoint = sent_wall + SignedDuration::try_from(round_trip / 2).unwrap_or_default();
        let estimate = estimate_offset(date, midpoint);
        let previous = self.offset_ms.swap(estimate.as_millis() as i64, Ordering::Relaxed);
        let first = !self.measured.send_replace(true);
        if first || (previous - estimate.as_millis() as i64).abs() > 1_000 {
            info!(offset_ms = estimate.as_millis() as i64, "read the apiserver's clock; schedules follow it");
        }
        Ok(Reading::Taken(estimate))
    }

    /// Take readings until `stop`: every 30 s, and before the first is taken from [`RETRY_FIRST`] apart, twice as
    /// far each time, up to that. A reading that could not be taken is logged as a warning while none was, since
    /// work waits for it, and quietly after.
    pub async fn follow(&self, client: Client, stop: CancellationToken) {
        let mut retry = RETRY_FIRST;
        loop {
            let measured = self.is_measured();
            match self.sample(&client).await {
                Ok(Reading::Taken(_)) => {}
                Ok(discarded) if !measured => {
                    warn!(reading = ?discarded, "could not read the apiserver's clock yet; recurring jobs wait for it")
                }
                Ok(discarded) => debug!(reading = ?discarded, "discarded a reading of the apiserver's clock"),
                Err(e) => warn!(error = %e, "could not read the apiserver's clock; keeping the last estimate"),
            }
            let every = if self.is_measured() { SAMPLE_EVERY } else { retry };
            retry = (retry * 2).min(SAMPLE_EVERY);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// The offset a `Date` header (whole seconds, truncated) shows against the local instant it was read at: the
/// server's time is somewhere in `[date, date + 1 s)`, so its middle is taken; offsets below the header's
/// resolution are taken as zero.
pub fn estimate_offset(date: Timestamp, local_midpoint: Timestamp) -> SignedDuration {
    let server = date + HALF_A_HEADER_SECOND;
    let offset = server.duration_since(local_midpoint);
    if offset.abs() <= RESOLUTION { SignedDuration::ZERO } else { offset }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(ms).unwrap()
    }

    #[test]
    fn a_clock_within_the_headers_resolution_is_taken_as_right() {
        assert_eq!(estimate_offset(at(100_000), at(100_900)), SignedDuration::ZERO);
        assert_eq!(estimate_offset(at(100_000), at(99_200)), SignedDuration::ZERO);
    }

    #[test]
    fn a_clock_twenty_seconds_ahead_is_measured_as_such() {
        // The server says 100 s; here it is 120.3 s.
        let offset = estimate_offset(at(100_000), at(120_300));
        assert_eq!(offset, SignedDuration::from_millis(-19_800));
    }

    #[test]
    fn two_replicas_agree_within_twice_what_one_may_be_off() {
        // A replica whose clock is `off` ms behind the apiserver's (negative: ahead) reads a `Date` header stamped at
        // server time `stamp`, and takes the middle of its round trip, up to half of MAX_ROUND_TRIP from the stamp:
        // its estimate is never further than half the agreement from the truth.
        let half_trip = (MAX_ROUND_TRIP / 2).as_millis() as i64;
        let most = (REPLICAS_AGREE_WITHIN / 2).as_millis() as i64;
        let mut worst = 0;
        for off in (-6_000..=6_000).step_by(37) {
            for stamp in (100_000..101_000).step_by(50) {
                for error in [-half_trip, 0, half_trip] {
                    let date = at(stamp - stamp % 1_000);
                    let estimate = estimate_offset(date, at(stamp - off + error)).as_millis() as i64;
                    worst = worst.max((estimate - off).abs());
                }
            }
        }
        assert!(worst <= most, "an estimate {worst} ms off, beyond {most} ms");
        assert!(worst > most - 100, "the bound is not loose: {worst} ms of {most} ms");
    }

    #[test]
    fn http_dates_parse() {
        let z = jiff::fmt::rfc2822::parse("Mon, 30 Nov 2026 12:21:49 GMT").unwrap();
        assert_eq!(z.timestamp(), "2026-11-30T12:21:49Z".parse::<Timestamp>().unwrap());
    }
}
