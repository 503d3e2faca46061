//! Opportunistic batching of ledger calls.
//!
//! Callers submit one item and wait for its result. A dispatcher takes the first
//! waiting item and every item already queued behind it (up to a maximum) as one
//! batch, and runs up to `max_in_flight` batches at once. An idle ledger thus
//! sends each item alone, with no added delay, and a busy one sends larger
//! batches: many items share one round trip and one commit.
//!
//! A batch runs in one transaction, so one bad item would fail the others. When a
//! batch of several items fails, each item is retried alone, and only the items
//! that fail alone report an error.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::LedgerError;

type Reply<R> = oneshot::Sender<Result<R, LedgerError>>;

/// A failure of a whole batch, repeated to each of its items.
#[derive(Debug, thiserror::Error)]
#[error("ledger batch failed: {0}")]
pub struct BatchFailed(String);

pub struct Batcher<T, R> {
    sender: mpsc::Sender<(T, Reply<R>)>,
}

impl<T: Clone + Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the dispatcher task. `execute` runs one batch and returns one
    /// result per item, in order. Must be called inside a Tokio runtime.
    pub fn spawn<F, Fut>(max_batch: usize, max_in_flight: usize, execute: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<R, LedgerError>>, LedgerError>> + Send + 'static,
    {
        let (sender, receiver) = mpsc::channel(max_batch * max_in_flight * 4);
        tokio::spawn(dispatch(
            receiver,
            max_batch.max(1),
            max_in_flight.max(1),
            Arc::new(execute),
        ));
        Self { sender }
    }

    /// Submits one item and waits for its result.
    pub async fn submit(&self, item: T) -> Result<R, LedgerError> {
        let (reply, result) = oneshot::channel();
        self.sender.send((item, reply)).await.map_err(|_| {
            LedgerError::Unavailable(Box::new(BatchFailed("the batcher stopped".into())))
        })?;
        result.await.map_err(|_| {
            LedgerError::Unavailable(Box::new(BatchFailed("the batch was dropped".into())))
        })?
    }
}

async fn dispatch<T, R, F, Fut>(
    mut receiver: mpsc::Receiver<(T, Reply<R>)>,
    max_batch: usize,
    max_in_flight: usize,
    execute: Arc<F>,
) where
    T: Clone + Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<R, LedgerError>>, LedgerError>> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    while let Some(first) = receiver.recv().await {
        // Wait for a free slot first, so items that arrive meanwhile join this batch.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }

        let execute = execute.clone();
        tokio::spawn(async move {
            let (items, replies): (Vec<T>, Vec<Reply<R>>) = batch.into_iter().unzip();
            let retry_alone = (items.len() > 1).then(|| items.clone());
            match (execute(items).await, retry_alone) {
                (Ok(results), _) => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
                (Err(_), Some(items)) => {
                    for (item, reply) in items.into_iter().zip(replies) {
                        let result = match execute(vec![item]).await {
                            Ok(mut results) if !results.is_empty() => results.swap_remove(0),
                            Ok(_) => Err(LedgerError::Unavailable(Box::new(BatchFailed(
                                "no result for the item".into(),
                            )))),
                            Err(error) => Err(error),
                        };
                        let _ = reply.send(result);
                    }
                }
                (Err(error), None) => {
                    if let Some(reply) = replies.into_iter().next() {
                        let _ = reply.send(Err(error));
                    }
                }
            }
            drop(permit);
        });
    }
}
