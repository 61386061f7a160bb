//! The one retry helper: capped exponential backoff with jitter, a permanent-error predicate
//! and a cancellation token.
//!
//! Every remote call in zenith goes through [`retry`], so the retry budget is the same
//! everywhere and can be tuned from one place (`ZENITH_RETRY_ATTEMPTS`). A permanent error
//! (bad credentials, a missing bucket, a missing object) is returned at once: retrying it
//! would only delay the message the user needs.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Errors that know whether trying again could help.
pub trait Retryable {
    /// `true` when repeating the same request cannot succeed (403, 404, bad input).
    fn is_permanent(&self) -> bool;
}

/// How many times to try and how long to wait in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first one included; at least 1.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each following one.
    pub base_delay: Duration,
    /// Longest single wait.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The default policy with `ZENITH_RETRY_ATTEMPTS` applied when it is set.
    pub fn from_env() -> Result<Self, String> {
        let mut policy = RetryPolicy::default();
        if let Ok(value) = std::env::var("ZENITH_RETRY_ATTEMPTS") {
            let attempts: u32 = value.trim().parse().map_err(|_| {
                format!("ZENITH_RETRY_ATTEMPTS={value:?} is not a whole number; use e.g. ZENITH_RETRY_ATTEMPTS=8")
            })?;
            if attempts == 0 {
                return Err("ZENITH_RETRY_ATTEMPTS must be at least 1".to_string());
            }
            policy.max_attempts = attempts;
        }
        Ok(policy)
    }

    /// The wait after failed attempt number `attempt` (1-based): half fixed, half random,
    /// so that many clients failing together do not retry in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max_delay);
        let half = capped / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Why [`retry`] gave up.
#[derive(Debug)]
pub enum RetryError<E> {
    /// The cancellation token fired; the operation may or may not have taken effect.
    Cancelled,
    /// The last error, and how many attempts were made.
    Failed { error: E, attempts: u32 },
}

/// Runs `op` until it succeeds, fails permanently, runs out of attempts or is cancelled.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    cancel: &CancellationToken,
    mut op: F,
) -> Result<T, RetryError<E>>
where
    E: Retryable + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(RetryError::Cancelled),
            result = op() => result,
        };
        match result {
            Ok(value) => return Ok(value),
            Err(error) if error.is_permanent() || attempt >= policy.max_attempts.max(1) => {
                return Err(RetryError::Failed {
                    error,
                    attempts: attempt,
                });
            }
            Err(error) => {
                let wait = policy.delay(attempt);
                tracing::debug!(attempt, ?wait, %error, "transient error, retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Err(RetryError::Cancelled),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct E(bool);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "permanent={}", self.0)
        }
    }
    impl Retryable for E {
        fn is_permanent(&self) -> bool {
            self.0
        }
    }

    fn fast(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry(&fast(5), &CancellationToken::new(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(E(true))
        })
        .await;
        assert!(matches!(r, Err(RetryError::Failed { attempts: 1, .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn transient_errors_are_retried_up_to_the_budget() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry(&fast(4), &CancellationToken::new(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(E(false))
        })
        .await;
        assert!(matches!(r, Err(RetryError::Failed { attempts: 4, .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn success_after_transient_failures() {
        let calls = AtomicU32::new(0);
        let r = retry(&fast(5), &CancellationToken::new(), || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(E(false))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn cancellation_stops_the_loop() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let r: Result<(), RetryError<E>> =
            retry(&fast(5), &cancel, || async { Err(E(false)) }).await;
        assert!(matches!(r, Err(RetryError::Cancelled)));
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for attempt in 1..12 {
            let d = p.delay(attempt);
            let full = (Duration::from_millis(100) * (1 << (attempt - 1).min(20))).min(p.max_delay);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} vs {full:?}"
            );
        }
    }
}
