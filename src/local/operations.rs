//! Long operations under way in zenith-local (new pgs, checkouts, snapshots), with their
//! progress in bytes, for `GET /operations`: whichever client started one (the CLI
//! through the API, or the console), the console shows how far it is. Each ends when its
//! work does, and stays listed for a minute after, finished or failed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::models::OperationInfo;
use crate::util::progress::{Progress, ProgressHandle};

const KEPT: Duration = Duration::from_secs(60);

/// The operations of one zenith-local.
#[derive(Default)]
pub struct Operations {
    next: AtomicU64,
    list: Mutex<Vec<Arc<Tracked>>>,
}

/// One operation's progress.
pub struct Tracked {
    id: u64,
    what: String,
    started_unix: u64,
    /// The work of the phases done (a checkout keeps the old state, then restores the
    /// new), and the total of the phase under way (revised as it becomes known).
    totals: Mutex<(u64, u64)>,
    done: AtomicU64,
    finished: AtomicBool,
    error: Mutex<Option<String>>,
    ended: Mutex<Option<Instant>>,
}

impl Progress for Tracked {
    fn set_total(&self, bytes: u64) {
        self.totals.lock().expect("lock").1 = bytes;
    }
    fn next_phase(&self) {
        let mut totals = self.totals.lock().expect("lock");
        *totals = (self.done.load(Ordering::Relaxed), 0);
    }
    fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
    fn finish(&self) {}
}

/// Ends its operation when dropped, however the work ended.
pub struct Running(Arc<Tracked>);

impl Running {
    /// Records how the work ended and passes its result on.
    pub fn outcome<T, E: std::fmt::Display>(&self, result: Result<T, E>) -> Result<T, E> {
        if let Err(e) = &result {
            *self.0.error.lock().expect("lock") = Some(e.to_string());
        }
        result
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.finished.store(true, Ordering::Relaxed);
        *self.0.ended.lock().expect("lock") = Some(Instant::now());
    }
}

impl Operations {
    /// Registers operation `what`: its guard, and the progress handle to pass down.
    pub fn start(&self, what: String) -> (Running, ProgressHandle) {
        let tracked = Arc::new(Tracked {
            id: self.next.fetch_add(1, Ordering::Relaxed) + 1,
            what,
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            totals: Mutex::new((0, 0)),
            done: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            error: Mutex::new(None),
            ended: Mutex::new(None),
        });
        let mut list = self.list.lock().expect("lock");
        prune(&mut list);
        list.push(Arc::clone(&tracked));
        (
            Running(Arc::clone(&tracked)),
            ProgressHandle(tracked as Arc<dyn Progress>),
        )
    }

    /// Operations under way, and those finished in the last minute, oldest first.
    pub fn list(&self) -> Vec<OperationInfo> {
        let mut list = self.list.lock().expect("lock");
        prune(&mut list);
        list.iter()
            .map(|t| {
                let (base, phase) = *t.totals.lock().expect("lock");
                let total = Some(base + phase).filter(|_| phase > 0);
                // Whole blocks are counted; the last block of a file may be partial.
                let done = t.done.load(Ordering::Relaxed);
                OperationInfo {
                    id: t.id,
                    what: t.what.clone(),
                    started_unix: t.started_unix,
                    done_bytes: total.map_or(done, |total| done.min(total)),
                    total_bytes: total,
                    running: !t.finished.load(Ordering::Relaxed),
                    error: t.error.lock().expect("lock").clone(),
                }
            })
            .collect()
    }
}

/// Drops operations that ended more than a minute ago.
fn prune(list: &mut Vec<Arc<Tracked>>) {
    list.retain(|t| {
        t.ended
            .lock()
            .expect("lock")
            .is_none_or(|e| e.elapsed() < KEPT)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_listed_and_ends_with_its_guard() {
        let ops = Operations::default();
        let (guard, progress) = ops.start("create pg b".into());
        progress.set_total(100);
        progress.add(40);
        let listed = ops.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].done_bytes, listed[0].total_bytes),
            (40, Some(100))
        );
        assert!(listed[0].running);
        // A revised total replaces the last; a second phase adds its own.
        progress.set_total(110);
        progress.add(70);
        progress.next_phase();
        progress.set_total(50);
        progress.add(10);
        let listed = ops.list();
        assert_eq!(
            (listed[0].done_bytes, listed[0].total_bytes),
            (120, Some(160))
        );
        assert!(guard.outcome(Err::<(), _>("disk full")).is_err());
        drop(guard);
        let listed = ops.list();
        assert!(!listed[0].running);
        assert_eq!(listed[0].error.as_deref(), Some("disk full"));
    }
}
