//! RocketMQ's time tables: the 18 delay levels of delay messages and the
//! consumer's retry backoff, plus the retry policy a broker announces in
//! its Settings reply.

use std::time::Duration;

use raftmq_proto::rocketmq as pb;

use crate::ClientError;
use crate::Result;
use crate::from_pb_duration;

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// RocketMQ's delay levels 1..=18: `1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m
/// 9m 10m 20m 30m 1h 2h` (index 0 is level 1).
pub const DELAY_LEVELS: [Duration; 18] = [
    secs(1),
    secs(5),
    secs(10),
    secs(30),
    secs(60),
    secs(120),
    secs(180),
    secs(240),
    secs(300),
    secs(360),
    secs(420),
    secs(480),
    secs(540),
    secs(600),
    secs(1200),
    secs(1800),
    secs(3600),
    secs(7200),
];

/// RocketMQ's consumer backoff: the delay before redelivery after delivery
/// attempt `n` failed is entry `n - 1`; the last entry repeats.
pub const CONSUMER_BACKOFF: [Duration; 18] = DELAY_LEVELS;

/// Delivery attempts before a message goes to the dead-letter queue
/// (RocketMQ: 16 retries after the first delivery).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 17;

/// The delay of delay level `level` (1..=18); anything else is an error.
pub fn delay_level(level: u32) -> Result<Duration> {
    match level {
        1..=18 => Ok(DELAY_LEVELS[level as usize - 1]),
        _ => Err(ClientError::Input(format!("delay level {level} outside 1..=18"))),
    }
}

/// How long a message stays invisible after delivery attempt `attempt`
/// (1 = first delivery) failed: RocketMQ's consumer backoff table.
pub fn consumer_backoff(attempt: u32) -> Duration {
    CONSUMER_BACKOFF[(attempt.max(1) as usize - 1).min(CONSUMER_BACKOFF.len() - 1)]
}

/// How a consumer group retries: attempts before the dead-letter queue and
/// the delay before each redelivery. From the broker's Settings reply
/// (`backoff_policy`), else RocketMQ's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delivery attempts before the dead-letter queue.
    pub max_attempts: u32,
    backoff: Backoff,
}

#[derive(Debug, Clone, PartialEq)]
enum Backoff {
    /// Delay after attempt `n` is `next[n - 1]`; the last one repeats.
    Customized(Vec<Duration>),
    /// `initial * multiplier^(n - 1)`, at most `max`.
    Exponential { initial: Duration, max: Duration, multiplier: f64 },
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: DEFAULT_MAX_ATTEMPTS, backoff: Backoff::Customized(CONSUMER_BACKOFF.to_vec()) }
    }
}

impl RetryPolicy {
    /// The policy a Settings reply describes; defaults for what it leaves out.
    pub fn from_pb(p: &pb::RetryPolicy) -> Self {
        let d = Self::default();
        let max_attempts = if p.max_attempts > 0 { p.max_attempts as u32 } else { d.max_attempts };
        let backoff = match &p.strategy {
            Some(pb::retry_policy::Strategy::CustomizedBackoff(c)) if !c.next.is_empty() => {
                Backoff::Customized(c.next.iter().map(from_pb_duration).collect())
            }
            Some(pb::retry_policy::Strategy::ExponentialBackoff(e)) => Backoff::Exponential {
                initial: e.initial.as_ref().map(from_pb_duration).unwrap_or(Duration::from_secs(1)),
                max: e.max.as_ref().map(from_pb_duration).unwrap_or(Duration::from_secs(7200)),
                multiplier: if e.multiplier.is_finite() && e.multiplier >= 1.0 { f64::from(e.multiplier) } else { 1.0 },
            },
            _ => d.backoff,
        };
        Self { max_attempts, backoff }
    }

    /// The delay before the next delivery after attempt `attempt` failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let n = attempt.max(1) as usize;
        match &self.backoff {
            Backoff::Customized(next) => next[(n - 1).min(next.len() - 1)],
            Backoff::Exponential { initial, max, multiplier } => {
                let f = multiplier.powi((n - 1).min(64) as i32);
                let d = initial.as_secs_f64() * f;
                if d.is_finite() && d < max.as_secs_f64() { Duration::from_secs_f64(d) } else { *max }
            }
        }
    }

    /// Whether a message whose delivery attempt `attempt` failed has used up
    /// its attempts (and goes to the dead-letter queue).
    pub fn exhausted(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_levels_match_rocketmq() {
        let want = "1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h";
        let got: Vec<String> = (1..=18)
            .map(|l| {
                let s = delay_level(l).unwrap().as_secs();
                if s % 3600 == 0 {
                    format!("{}h", s / 3600)
                } else if s % 60 == 0 {
                    format!("{}m", s / 60)
                } else {
                    format!("{s}s")
                }
            })
            .collect();
        assert_eq!(got.join(" "), want);
        assert!(delay_level(0).is_err());
        assert!(delay_level(19).is_err());
    }

    #[test]
    fn consumer_backoff_by_attempt() {
        assert_eq!(consumer_backoff(0), Duration::from_secs(1));
        assert_eq!(consumer_backoff(1), Duration::from_secs(1));
        assert_eq!(consumer_backoff(2), Duration::from_secs(5));
        assert_eq!(consumer_backoff(4), Duration::from_secs(30));
        assert_eq!(consumer_backoff(16), Duration::from_secs(1800));
        assert_eq!(consumer_backoff(18), Duration::from_secs(7200));
        assert_eq!(consumer_backoff(1000), Duration::from_secs(7200));
    }

    #[test]
    fn retry_policy_from_settings() {
        let d = RetryPolicy::default();
        assert_eq!(d.max_attempts, 17);
        assert!(!d.exhausted(16));
        assert!(d.exhausted(17));
        for a in 1..20 {
            assert_eq!(d.delay(a), consumer_backoff(a));
        }
        let custom = RetryPolicy::from_pb(&pb::RetryPolicy {
            max_attempts: 3,
            strategy: Some(pb::retry_policy::Strategy::CustomizedBackoff(pb::CustomizedBackoff {
                next: vec![crate::pb_duration(Duration::from_secs(2)), crate::pb_duration(Duration::from_secs(7))],
            })),
        });
        assert_eq!(custom.max_attempts, 3);
        assert_eq!(custom.delay(1), Duration::from_secs(2));
        assert_eq!(custom.delay(2), Duration::from_secs(7));
        assert_eq!(custom.delay(9), Duration::from_secs(7));
        let exp = RetryPolicy::from_pb(&pb::RetryPolicy {
            max_attempts: 0,
            strategy: Some(pb::retry_policy::Strategy::ExponentialBackoff(pb::ExponentialBackoff {
                initial: Some(crate::pb_duration(Duration::from_millis(100))),
                max: Some(crate::pb_duration(Duration::from_secs(1))),
                multiplier: 2.0,
            })),
        });
        assert_eq!(exp.max_attempts, 17);
        assert_eq!(exp.delay(1), Duration::from_millis(100));
        assert_eq!(exp.delay(3), Duration::from_millis(400));
        assert_eq!(exp.delay(50), Duration::from_secs(1));
        // An empty customized table falls back to the default one.
        let empty = RetryPolicy::from_pb(&pb::RetryPolicy {
            max_attempts: 5,
            strategy: Some(pb::retry_policy::Strategy::CustomizedBackoff(pb::CustomizedBackoff { next: vec![] })),
        });
        assert_eq!(empty.delay(2), Duration::from_secs(5));
    }
}
