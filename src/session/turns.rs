//! One user's commands take turns: at most one of them runs (is being polled) at a time, whatever the number of
//! tabs the user has.
//!
//! Why: the frames a tab has already sent are ready at once, so a user with many tabs, each sending its burst of
//! heavy commands, could keep every runtime thread busy while every other user's tabs waited (issue 14: twenty tabs
//! sending `setSubscriptions` of a hundred topics took other users' ping p99 from 0.3 ms past 100 ms on two cores).
//! With turns, one user occupies at most one thread. A turn lasts one poll, never across an await: a command
//! waiting on a backend does not hold up the user's other tabs. Waiting is fair (the semaphore queues in order).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// A user's turn: one per session.
#[derive(Clone)]
pub struct Turns(Arc<Semaphore>);

impl Default for Turns {
    fn default() -> Self {
        Turns(Arc::new(Semaphore::new(1)))
    }
}

impl Turns {
    /// `fut`, polled only while it holds the user's turn.
    pub fn run<F: Future>(&self, fut: F) -> InTurn<F> {
        InTurn {
            fut: Box::pin(fut),
            turns: self.0.clone(),
            waiting: None,
        }
    }
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A future that takes the user's turn for each poll.
pub struct InTurn<F> {
    fut: Pin<Box<F>>,
    turns: Arc<Semaphore>,
    /// Queued for the turn (a poll found it taken).
    waiting: Option<Acquire>,
}

impl<F: Future> Future for InTurn<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let turn = match this.waiting.as_mut() {
            Some(acquire) => match acquire.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(t) => {
                    this.waiting = None;
                    t.ok()
                }
            },
            None => match this.turns.clone().try_acquire_owned() {
                Ok(t) => Some(t),
                Err(TryAcquireError::NoPermits) => {
                    let mut acquire: Acquire = Box::pin(this.turns.clone().acquire_owned());
                    match acquire.as_mut().poll(cx) {
                        Poll::Pending => {
                            this.waiting = Some(acquire);
                            return Poll::Pending;
                        }
                        Poll::Ready(t) => t.ok(),
                    }
                }
                // Never closed; were it, the command would run without turns rather than never.
                Err(TryAcquireError::Closed) => None,
            },
        };
        let out = this.fut.as_mut().poll(cx);
        drop(turn);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Two commands of one user never run at the same moment, on a multi-threaded runtime, and a command waiting on
    /// something else (a backend) lets the other run meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_poll_at_a_time_never_across_an_await() {
        let turns = Turns::default();
        let running = Arc::new(AtomicUsize::new(0));
        let overlap = Arc::new(AtomicUsize::new(0));
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let busy = |running: Arc<AtomicUsize>, overlap: Arc<AtomicUsize>| async move {
            for _ in 0..200 {
                if running.fetch_add(1, Ordering::SeqCst) > 0 {
                    overlap.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
                running.fetch_sub(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        };
        // Holds no turn while it waits: the others finish although it waits for them.
        let waiter = tokio::spawn(turns.run(async move { wait.await.is_ok() }));
        let a = tokio::spawn(turns.run(busy(running.clone(), overlap.clone())));
        let b = tokio::spawn(turns.run(busy(running.clone(), overlap.clone())));
        let both = async {
            a.await.unwrap();
            b.await.unwrap();
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), both)
            .await
            .expect("a command waiting on something else kept the turn");
        release.send(()).unwrap();
        assert!(waiter.await.unwrap());
        assert_eq!(overlap.load(Ordering::SeqCst), 0, "two polls overlapped");
    }
}
