//! Delivery bookkeeping: which consumed offsets are finished, and how far each partition may be
//! committed. An offset is committable only when it and every earlier consumed offset of its
//! partition have all their outputs acknowledged (docs/DESIGN.md §4).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

pub(crate) type PartitionKey = (String, i32);

/// Identifies one consumed record; `generation` changes when the partition is (re)assigned,
/// so completions from before a revoke/rewind are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub generation: u64,
}

impl std::fmt::Display for Ticket {
    /// `topic/partition/offset`, as in the `dcam-source` header.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::event::record_name(&self.topic, self.partition, self.offset))
    }
}

/// A consumed record whose outputs are not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Pending {
    since: Instant,
    bytes: usize,
}

#[derive(Debug, Default)]
struct PartitionState {
    generation: u64,
    pending: BTreeMap<i64, Pending>,
    /// The first offset registered in this generation: where consumption (re)started.
    first: Option<i64>,
    /// One past the highest offset registered in this generation.
    next: Option<i64>,
    /// Position last handed out for committing.
    committed: Option<i64>,
}

impl PartitionState {
    fn position(&self) -> Option<i64> {
        match self.pending.keys().next() {
            Some(first) => Some(*first),
            None => self.next,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    partitions: HashMap<PartitionKey, PartitionState>,
    next_generation: u64,
    in_flight: usize,
    in_flight_bytes: usize,
    /// Inputs finished since start: the stall check watches it move.
    completed: u64,
}

impl Inner {
    fn drop_pending(&mut self, old: PartitionState) {
        self.in_flight -= old.pending.len();
        self.in_flight_bytes -= old.pending.values().map(|p| p.bytes).sum::<usize>();
    }
}

/// The first error that must stop this instance (a record the broker will never accept, a
/// fenced transaction). Whoever hits it sets it; the source loop stops on it without committing
/// past the stuck record, and the orchestrator restarts the process.
#[derive(Debug, Default)]
pub struct Fatal(Mutex<Option<String>>);

impl Fatal {
    /// Records `message` unless an earlier fatal error is already recorded.
    pub fn set(&self, message: String) {
        tracing::error!(error = %message, "fatal: stopping this instance");
        self.0.lock().expect("fatal").get_or_insert(message);
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().expect("fatal").clone()
    }
}

/// Thread-safe tracker shared by the source (register, commit) and the sinks (complete).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking a partition (on assignment); earlier tickets for it become stale.
    pub fn assign(&self, topic: &str, partition: i32) {
        let mut inner = self.inner.lock().expect("tracker");
        inner.next_generation += 1;
        let generation = inner.next_generation;
        if let Some(old) = inner.partitions.insert((topic.to_string(), partition), PartitionState { generation, ..Default::default() }) {
            inner.drop_pending(old);
        }
        self.changed.notify_all();
    }

    /// Stops tracking a partition (revoked, or rewound after an aborted transaction).
    pub fn forget(&self, topic: &str, partition: i32) {
        let mut inner = self.inner.lock().expect("tracker");
        if let Some(old) = inner.partitions.remove(&(topic.to_string(), partition)) {
            inner.drop_pending(old);
        }
        self.changed.notify_all();
    }

    /// Records a consumed offset of `bytes` payload. Offsets of a partition arrive in increasing order.
    pub fn register(&self, topic: &str, partition: i32, offset: i64, bytes: usize) -> Ticket {
        let mut inner = self.inner.lock().expect("tracker");
        let key = (topic.to_string(), partition);
        if !inner.partitions.contains_key(&key) {
            inner.next_generation += 1;
            let generation = inner.next_generation;
            inner.partitions.insert(key.clone(), PartitionState { generation, ..Default::default() });
        }
        let state = inner.partitions.get_mut(&key).expect("inserted");
        let generation = state.generation;
        let added = state.pending.insert(offset, Pending { since: Instant::now(), bytes }).is_none();
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        state.first.get_or_insert(offset);
        if added {
            inner.in_flight += 1;
            inner.in_flight_bytes += bytes;
        }
        Ticket { topic: topic.to_string(), partition, offset, generation }
    }

    /// Marks a ticket's outputs as acknowledged. Returns false for a stale ticket.
    pub fn complete(&self, ticket: &Ticket) -> bool {
        let mut inner = self.inner.lock().expect("tracker");
        let Some(state) = inner.partitions.get_mut(&(ticket.topic.clone(), ticket.partition)) else {
            return false;
        };
        if state.generation != ticket.generation {
            return false;
        }
        let Some(done) = state.pending.remove(&ticket.offset) else {
            return false;
        };
        inner.in_flight -= 1;
        inner.in_flight_bytes -= done.bytes;
        inner.completed += 1;
        self.changed.notify_all();
        true
    }

    pub fn in_flight(&self) -> usize {
        self.inner.lock().expect("tracker").in_flight
    }

    /// Inputs finished since start (monotonic).
    pub fn completed(&self) -> u64 {
        self.inner.lock().expect("tracker").completed
    }

    /// Payload bytes of the unfinished records.
    pub fn in_flight_bytes(&self) -> usize {
        self.inner.lock().expect("tracker").in_flight_bytes
    }

    /// Where this generation of the partition started consuming, if it consumed anything.
    pub fn first_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.inner.lock().expect("tracker").partitions.get(&(topic.to_string(), partition)).and_then(|s| s.first)
    }

    /// Partitions whose oldest unfinished record has waited longer than `limit`, with that wait.
    pub fn stuck(&self, limit: Duration) -> Vec<(PartitionKey, Duration)> {
        let inner = self.inner.lock().expect("tracker");
        let mut out: Vec<_> = inner
            .partitions
            .iter()
            .filter_map(|(k, s)| s.pending.values().next().map(|p| (k.clone(), p.since.elapsed())))
            .filter(|(_, waited)| *waited > limit)
            .collect();
        out.sort();
        out
    }

    /// Whether a ticket still belongs to the current assignment.
    pub fn is_current(&self, ticket: &Ticket) -> bool {
        let inner = self.inner.lock().expect("tracker");
        inner.partitions.get(&(ticket.topic.clone(), ticket.partition)).is_some_and(|s| s.generation == ticket.generation)
    }

    /// Positions (next offset to read) past what the broker confirmed as committed: what to
    /// commit now. Nothing is marked here: a commit that fails (a coordinator restart, a
    /// rebalance) leaves them due, so the next turn sends them again, even for a partition that
    /// stays idle. `mark_committed` records what the broker accepted.
    pub fn commits_due(&self, only: Option<&[PartitionKey]>) -> Vec<(PartitionKey, i64)> {
        let inner = self.inner.lock().expect("tracker");
        let mut out: Vec<_> = inner
            .partitions
            .iter()
            .filter(|(k, _)| only.is_none_or(|o| o.contains(k)))
            .filter_map(|(k, s)| s.position().filter(|pos| s.committed.is_none_or(|c| *pos > c)).map(|pos| (k.clone(), pos)))
            .collect();
        out.sort();
        out
    }

    /// Current committable positions of the given partitions (or all), without marking them.
    pub fn positions(&self, only: Option<&[PartitionKey]>) -> Vec<(PartitionKey, i64)> {
        let inner = self.inner.lock().expect("tracker");
        let mut out: Vec<_> =
            inner.partitions.iter().filter(|(k, _)| only.is_none_or(|o| o.contains(k))).filter_map(|(k, s)| s.position().map(|p| (k.clone(), p))).collect();
        out.sort();
        out
    }

    /// One past the highest offset registered per partition: where consumption continues.
    pub fn next_offsets(&self) -> Vec<(PartitionKey, i64)> {
        let inner = self.inner.lock().expect("tracker");
        let mut out: Vec<_> = inner.partitions.iter().filter_map(|(k, s)| s.next.map(|n| (k.clone(), n))).collect();
        out.sort();
        out
    }

    /// Records positions the broker accepted as committed.
    pub fn mark_committed(&self, commits: &[(PartitionKey, i64)]) {
        let mut inner = self.inner.lock().expect("tracker");
        for (key, pos) in commits {
            if let Some(s) = inner.partitions.get_mut(key) {
                s.committed = Some(s.committed.map_or(*pos, |c| c.max(*pos)));
            }
        }
    }

    /// Waits until none of `partitions` (all if `None`) has pending work, or the timeout passes.
    /// Returns whether they drained.
    pub fn wait_drained(&self, partitions: Option<&[PartitionKey]>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.inner.lock().expect("tracker");
        loop {
            let busy = inner.partitions.iter().any(|(k, s)| !s.pending.is_empty() && partitions.is_none_or(|p| p.contains(k)));
            if !busy {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = self.changed.wait_timeout(inner, deadline - now).expect("tracker").0;
        }
    }

    /// Waits until the in-flight count is below `limit` or the timeout passes.
    pub fn wait_below(&self, limit: usize, timeout: Duration) -> bool {
        let inner = self.inner.lock().expect("tracker");
        let (inner, _) = self.changed.wait_timeout_while(inner, timeout, |i| i.in_flight >= limit).expect("tracker");
        inner.in_flight < limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_finished_prefix() {
        let t = OffsetTracker::new();
        let a = t.register("img", 0, 10, 10);
        let b = t.register("img", 0, 11, 10);
        let c = t.register("img", 0, 12, 10);
        assert_eq!(t.commits_due(None), vec![(("img".into(), 0), 10)], "nothing finished: position stays at the first");
        t.mark_committed(&t.commits_due(None));
        assert!(t.complete(&c));
        assert!(t.complete(&b));
        assert_eq!(t.commits_due(None), vec![], "10 is unfinished, so 11 and 12 cannot be committed");
        assert!(t.complete(&a));
        assert_eq!(t.commits_due(None), vec![(("img".into(), 0), 13)]);
        t.mark_committed(&t.commits_due(None));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.completed(), 3);
        assert_eq!(t.commits_due(None), vec![], "no change, no commit");
    }

    #[test]
    fn a_commit_the_broker_did_not_confirm_stays_due_for_an_idle_partition() {
        let t = OffsetTracker::new();
        let a = t.register("img", 0, 7, 10);
        assert!(t.complete(&a));
        let due = t.commits_due(None);
        assert_eq!(due, vec![(("img".into(), 0), 8)]);
        // The commit failed (coordinator restarting): nothing is marked, and the partition gets
        // no more input. The next turn must still send it.
        assert_eq!(t.commits_due(None), due, "an unconfirmed position is due again");
        t.mark_committed(&due);
        assert_eq!(t.commits_due(None), vec![]);
        // A late confirmation of an older position never moves it back.
        t.mark_committed(&[(("img".into(), 0), 5)]);
        assert_eq!(t.commits_due(None), vec![]);
    }

    #[test]
    fn counts_bytes_and_reports_stuck_partitions() {
        let t = OffsetTracker::new();
        let a = t.register("img", 0, 1, 1000);
        let _b = t.register("img", 1, 1, 24);
        assert_eq!(t.in_flight_bytes(), 1024);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(t.stuck(Duration::from_millis(20)).len(), 2);
        assert!(t.complete(&a));
        assert_eq!(t.in_flight_bytes(), 24);
        assert_eq!(t.stuck(Duration::from_millis(20)).iter().map(|(k, _)| k.1).collect::<Vec<_>>(), vec![1]);
        t.forget("img", 1);
        assert_eq!((t.in_flight(), t.in_flight_bytes()), (0, 0));
    }

    #[test]
    fn partitions_are_independent() {
        let t = OffsetTracker::new();
        let a0 = t.register("img", 0, 5, 10);
        let _a1 = t.register("img", 1, 7, 10);
        t.complete(&a0);
        assert_eq!(t.positions(None), vec![(("img".into(), 0), 6), (("img".into(), 1), 7)]);
    }

    #[test]
    fn stale_tickets_after_reassignment_are_ignored() {
        let t = OffsetTracker::new();
        let old = t.register("img", 0, 1, 10);
        t.forget("img", 0);
        assert_eq!(t.in_flight(), 0);
        t.assign("img", 0);
        let new = t.register("img", 0, 1, 10);
        assert!(!t.complete(&old), "completion from the revoked generation");
        assert!(!t.is_current(&old));
        assert_eq!(t.in_flight(), 1);
        assert!(t.complete(&new));
    }

    #[test]
    fn drain_wait_wakes_on_completion() {
        let t = std::sync::Arc::new(OffsetTracker::new());
        let tk = t.register("img", 0, 1, 10);
        assert!(!t.wait_drained(None, Duration::from_millis(20)));
        let t2 = t.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            t2.complete(&tk);
        });
        assert!(t.wait_drained(Some(&[("img".into(), 0)]), Duration::from_secs(5)));
        h.join().unwrap();
        assert!(t.wait_below(1, Duration::from_millis(1)));
    }
}
