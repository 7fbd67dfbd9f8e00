//! A byte budget shared by all decode workers: an image's decoded size is known from its header,
//! and a decode starts only once that much is free. Per-image limits alone let N workers hold N
//! worst-case images at once (docs/DESIGN.md §8: a 311 KB PNG can need 440 MB decoded).

use std::sync::{Condvar, Mutex};

#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// Bytes held from a budget; given back on drop.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a MemoryBudget,
    bytes: u64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Self {
        Self { limit, used: Mutex::new(0), freed: Condvar::new() }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Waits until `bytes` fit, then holds them. None if they never can (more than the limit).
    pub fn reserve(&self, bytes: u64) -> Option<Reservation<'_>> {
        if bytes > self.limit {
            return None;
        }
        let mut used = self.used.lock().expect("memory budget");
        while *used + bytes > self.limit {
            used = self.freed.wait(used).expect("memory budget");
        }
        *used += bytes;
        Some(Reservation { budget: self, bytes })
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn in_use(&self) -> u64 {
        *self.used.lock().expect("memory budget")
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        *self.budget.used.lock().expect("memory budget") -= self.bytes;
        self.budget.freed.notify_all();
    }
}

/// A quarter of the memory this process may use: the cgroup limit when there is one (a pod's
/// `resources.limits.memory`), else physical memory.
pub(crate) fn default_decode_budget() -> u64 {
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .find(|&b| b < 1 << 50);
    let physical = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    });
    let total = cgroup.or(physical).unwrap_or(4 << 30);
    (total / 4).max(64 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn reservations_wait_for_room_and_refuse_the_impossible() {
        let b = Arc::new(MemoryBudget::new(100));
        assert!(b.reserve(101).is_none(), "bigger than the whole budget");
        let first = b.reserve(70).unwrap();
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || {
            let r = b2.reserve(50).unwrap();
            b2.in_use() + r.bytes - r.bytes
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(b.in_use(), 70, "the second reservation waits");
        drop(first);
        assert_eq!(waiter.join().unwrap(), 50);
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn default_is_a_quarter_of_some_real_limit() {
        let d = default_decode_budget();
        assert!(d >= 64 << 20, "{d}");
    }
}
