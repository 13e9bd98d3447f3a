//! Admission: a concurrency limit, not a rate limit. A permit is held by the response
//! body itself, so it returns only when the response (a stream included) has ended or
//! the client has gone. Requests over the limit wait in FIFO order (tokio's semaphore is
//! fair) up to `queue_size` of them and `queue_timeout` each; then 429 or 503.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::{ApiError, ErrorKind};

pub(crate) struct Admission {
    sem: Arc<Semaphore>,
    max: usize,
    queued: AtomicUsize,
    queue_size: usize,
    timeout: Duration,
}

/// Why a request was not admitted, for the error metric.
pub(crate) enum Refused {
    QueueFull(ApiError),
    QueueTimeout(ApiError),
    /// It needs more permits than there are.
    TooLarge(ApiError),
}

struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub(crate) fn new(max: usize, queue_size: usize, timeout: Duration) -> Self {
        Admission { sem: Arc::new(Semaphore::new(max)), max, queued: AtomicUsize::new(0), queue_size, timeout }
    }

    /// Admits a request that makes `generations` generations (one permit each).
    pub(crate) async fn admit(&self, generations: usize) -> Result<OwnedSemaphorePermit, Refused> {
        let Some(n) = u32::try_from(generations).ok().filter(|n| *n as usize <= self.max) else {
            return Err(Refused::TooLarge(ApiError::bad_request(format!(
                "this request makes {generations} generations, more than --max-concurrent-requests {}",
                self.max
            ))));
        };
        // No jumping the queue: with waiters present there are no free permits to take.
        if let Ok(permit) = self.sem.clone().try_acquire_many_owned(n) {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.queue_size {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            let secs = self.timeout.as_secs().clamp(1, 60);
            return Err(Refused::QueueFull(
                ApiError::new(
                    ErrorKind::RateLimit,
                    format!(
                        "the router is at --max-concurrent-requests {} with --queue-size {} requests already waiting; retry later",
                        self.max, self.queue_size
                    ),
                )
                .retry_after(secs),
            ));
        }
        let _queued = Queued(&self.queued);
        match tokio::time::timeout(self.timeout, self.sem.clone().acquire_many_owned(n)).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Refused::QueueTimeout(
                ApiError::new(
                    ErrorKind::ServiceUnavailable,
                    format!("waited {:.1}s for a free slot (--queue-timeout-secs); the router is saturated", self.timeout.as_secs_f64()),
                )
                .retry_after(self.timeout.as_secs().clamp(1, 60)),
            )),
        }
    }

    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub(crate) fn in_use(&self) -> usize {
        self.max - self.sem.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn permits_queue_in_order_then_refuse() {
        let a = Arc::new(Admission::new(1, 1, Duration::from_millis(200)));
        let first = a.admit(1).await.ok().unwrap();
        assert_eq!(a.in_use(), 1);
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(1).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(a.queued(), 1);
        assert!(matches!(a.admit(1).await, Err(Refused::QueueFull(_))), "queue of one is full");
        drop(first);
        assert!(waiter.await.unwrap(), "the waiter got the freed permit");
        assert_eq!(a.in_use(), 0);
        assert_eq!(a.queued(), 0);
        let _hold = a.admit(1).await.ok().unwrap();
        assert!(matches!(a.admit(1).await, Err(Refused::QueueTimeout(_))));
        assert_eq!(a.queued(), 0);
    }
}
