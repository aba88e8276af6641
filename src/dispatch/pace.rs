//! A token bucket: at most `rate` actions per second, in bursts of at most `burst`.

use std::time::{Duration, Instant};

/// See the module docs.
#[derive(Debug)]
pub struct Pace {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Pace { rate, burst, tokens: burst, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// Take one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How many tokens there are now.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens as usize
    }

    /// How long until the next token.
    pub fn wait(&self) -> Duration {
        if self.tokens >= 1.0 { Duration::ZERO } else { Duration::from_secs_f64((1.0 - self.tokens) / self.rate) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_spent_at_once_then_tokens_come_at_the_rate() {
        let t0 = Instant::now();
        let mut p = Pace::new(10.0, 3.0, t0);
        assert_eq!((0..5).filter(|_| p.take(t0)).count(), 3);
        assert_eq!(p.wait(), Duration::from_millis(100));
        assert!(!p.take(t0 + Duration::from_millis(50)));
        assert!(p.take(t0 + Duration::from_millis(100)));
        assert_eq!(p.available(t0 + Duration::from_secs(60)), 3, "never more than the burst");
    }
}
