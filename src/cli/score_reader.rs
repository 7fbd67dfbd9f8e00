//! Reads score records back from a topic in the background, for the tools that publish events
//! and then report on them (`demo`, `bench`). The count of records read so far is observable, so
//! a publisher can keep a bounded window of unscored events in flight.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::event::ScoreRecord;

pub(super) struct ScoreReader {
    topic: String,
    expected: usize,
    read: watch::Receiver<usize>,
    task: Option<JoinHandle<Result<Vec<ScoreRecord>>>>,
}

impl ScoreReader {
    /// Subscribes a fresh group to `topic` (from the beginning, committed records only) and reads
    /// until `expected` records have arrived.
    pub(super) fn start(client: rdkafka::ClientConfig, topic: &str, expected: usize) -> Result<Self> {
        let consumer: StreamConsumer = client
            .clone()
            .set("group.id", format!("dcam-reader-{}", rand::random::<u32>()))
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", "6000")
            .set("topic.metadata.refresh.interval.ms", "1000")
            .create()
            .context("creating the score reader")?;
        consumer.subscribe(&[topic])?;
        let (count, read) = watch::channel(0);
        let task = tokio::spawn(async move {
            let mut out = Vec::with_capacity(expected);
            while out.len() < expected {
                match consumer.recv().await {
                    Ok(m) => {
                        out.push(serde_json::from_slice(m.payload().unwrap_or_default()).context("score record is not valid JSON")?);
                        count.send_replace(out.len());
                    }
                    Err(e) => tracing::debug!(error = %e, "score reader error"),
                }
            }
            Ok(out)
        });
        Ok(Self { topic: topic.to_string(), expected, read, task: Some(task) })
    }

    /// Records read so far.
    pub(super) fn count(&self) -> usize {
        *self.read.borrow()
    }

    /// Waits until at least `n` records have been read; fails when none arrives for `stall`.
    pub(super) async fn wait_for(&mut self, n: usize, stall: Duration) -> Result<()> {
        while *self.read.borrow_and_update() < n {
            match tokio::time::timeout(stall, self.read.changed()).await {
                Err(_) => bail!("no score record arrived on {} for {stall:?}: {} of {n} so far", self.topic, self.count()),
                // The reader stopped early: only an error ends it before `expected`.
                Ok(Err(_)) => return self.join().await.map(|_| ()),
                Ok(Ok(())) => {}
            }
        }
        Ok(())
    }

    /// Waits for every expected record and returns them.
    pub(super) async fn finish(mut self, stall: Duration) -> Result<Vec<ScoreRecord>> {
        self.wait_for(self.expected, stall).await?;
        self.join().await
    }

    async fn join(&mut self) -> Result<Vec<ScoreRecord>> {
        let task = self.task.take().ok_or_else(|| anyhow!("score reader already finished"))?;
        task.await.context("score reader task")?
    }
}

impl Drop for ScoreReader {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}
