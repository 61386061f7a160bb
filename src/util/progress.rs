//! Progress of long operations, as an injected trait: the library reports bytes, the
//! command line decides how (or whether) to draw them. Nothing here knows about terminals.

use std::sync::Arc;

/// Receives progress in bytes. Implementations must be cheap: `add` is called often, from
/// several threads.
pub trait Progress: Send + Sync {
    /// The amount of work, once known.
    fn set_total(&self, bytes: u64);
    /// Work done since the last call.
    fn add(&self, bytes: u64);
    /// The operation ended (successfully or not).
    fn finish(&self);
    /// The work so far is done and another part begins, with a total of its own (a
    /// checkout keeps the old state, then restores the new). Ignored by default.
    fn next_phase(&self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn set_total(&self, _: u64) {}
    fn add(&self, _: u64) {}
    fn finish(&self) {}
}

/// A shared handle, `Silent` by default.
#[derive(Clone)]
pub struct ProgressHandle(pub Arc<dyn Progress>);

impl Default for ProgressHandle {
    fn default() -> Self {
        ProgressHandle(Arc::new(Silent))
    }
}

impl std::fmt::Debug for ProgressHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHandle")
    }
}

impl std::ops::Deref for ProgressHandle {
    type Target = dyn Progress;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}
