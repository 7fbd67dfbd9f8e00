//! One stop signal for a run, as mini-redis's `Shutdown` but for threads (the operator's loops
//! are threads; its tasks end with the pipeline): every loop holds a clone and waits on it instead
//! of polling a flag, and the deadline the whole stop must meet (`pipeline.shutdown_timeout_ms`)
//! is kept beside it.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

#[derive(Clone)]
pub(crate) struct Shutdown(Arc<Inner>);

struct Inner {
    requested: Mutex<bool>,
    /// Wakes threads blocked in `sleep`.
    changed: Condvar,
    /// Signals that stop with this one (a component that may also stop on its own).
    children: Mutex<Vec<Weak<Inner>>>,
    grace: Duration,
}

impl Shutdown {
    /// `grace`: how long a stop may take once requested before the process gives up on it.
    pub(crate) fn new(grace: Duration) -> Self {
        Self(Arc::new(Inner { requested: Mutex::new(false), changed: Condvar::new(), children: Mutex::default(), grace }))
    }

    /// A signal that is requested with this one, and can also be requested alone (a component
    /// dropped before the run ends) without stopping the run.
    pub(crate) fn child(&self) -> Self {
        let child = Self::new(self.0.grace);
        self.0.children.lock().expect("shutdown").push(Arc::downgrade(&child.0));
        if self.is_requested() {
            child.request();
        }
        child
    }

    /// Asks every holder to stop; the second and later calls do nothing.
    pub(crate) fn request(&self) {
        {
            let mut requested = self.0.requested.lock().expect("shutdown");
            if *requested {
                return;
            }
            *requested = true;
        }
        self.0.changed.notify_all();
        let children = std::mem::take(&mut *self.0.children.lock().expect("shutdown"));
        for child in children.iter().filter_map(Weak::upgrade) {
            Self(child).request();
        }
    }

    pub(crate) fn is_requested(&self) -> bool {
        *self.0.requested.lock().expect("shutdown")
    }

    /// Sleeps up to `timeout`, waking at once for a stop; true when one is requested.
    pub(crate) fn sleep(&self, timeout: Duration) -> bool {
        let requested = self.0.requested.lock().expect("shutdown");
        let (requested, _) = self.0.changed.wait_timeout_while(requested, timeout, |r| !*r).expect("shutdown");
        *requested
    }

    /// How long a stop may take once requested.
    pub(crate) fn grace(&self) -> Duration {
        self.0.grace
    }

    /// Once a stop is requested, the process exits after the grace period whatever is stuck (a
    /// broker that is gone, a dependency that hangs): the orchestrator's grace period is not
    /// waited out into a SIGKILL, and what was not committed is read again after the restart.
    pub(crate) fn spawn_deadline(&self) -> std::io::Result<()> {
        let shutdown = self.clone();
        std::thread::Builder::new().name("shutdown-deadline".into()).spawn(move || {
            while !shutdown.sleep(Duration::from_secs(3600)) {}
            let timeout = shutdown.grace();
            std::thread::sleep(timeout);
            tracing::error!(?timeout, "shutdown did not finish within pipeline.shutdown_timeout_ms; exiting, uncommitted work is read again after restart");
            eprintln!("error: shutdown did not finish within {timeout:?}; uncommitted work is read again after restart");
            std::process::exit(2);
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_sleeping_thread_wakes_at_the_request_not_at_its_timeout() {
        let shutdown = Shutdown::new(Duration::from_secs(1));
        let sleeper = {
            let s = shutdown.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                (s.sleep(Duration::from_secs(60)), t0.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        shutdown.request();
        let (requested, waited) = sleeper.join().unwrap();
        assert!(requested);
        assert!(waited < Duration::from_secs(30), "slept {waited:?}");
        assert!(!Shutdown::new(Duration::ZERO).sleep(Duration::from_millis(1)));
    }

    #[test]
    fn a_child_stops_with_its_parent_but_not_the_other_way() {
        let parent = Shutdown::new(Duration::from_secs(1));
        let alone = parent.child();
        alone.request();
        assert!(!parent.is_requested());
        let child = parent.child();
        parent.request();
        assert!(child.is_requested());
        assert!(parent.child().is_requested(), "a child of a stopped run starts stopped");
    }
}
