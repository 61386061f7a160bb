//! Replacing a stopped pg's data by a snapshot without losing anything: the state it left
//! is kept as `NAME@HEAD{n}` first, the target is built beside the old data (files taken
//! over, only differing blocks written) and swapped in whole. Until the swap, the pg is
//! marked incomplete ([`super::markers`]): a checkout cut short leaves a pg that refuses
//! to start or be snapshotted and says how to restore it.

use super::markers::{incomplete, mark_incomplete, swap_data};
use super::store::{prepare_for_postgres, wal_line_from};
use super::Pageserver;
use crate::compute::node::{Node, NodeState};
use crate::models::{OpError, OpResult};
use crate::snapshot::{zenith, Manifest};
use crate::util::progress::ProgressHandle;

impl Pageserver {
    /// Replaces the data of the stopped pg `node` by snapshot `target` of the repo; returns
    /// the snapshot that keeps the state it left. On failure the old state is put back
    /// (from the kept snapshot) and the original error returned.
    pub async fn checkout_stopped(
        &self,
        node: &Node,
        state: &mut NodeState,
        target: &Manifest,
        progress: ProgressHandle,
    ) -> OpResult<Manifest> {
        let name = &node.name;
        let store = self.store().await?;
        // After a checkout that failed halfway, the state it kept is all there is.
        let interrupted = incomplete(node);
        let fresh = node.dir.join("data.checkout");
        let _ = std::fs::remove_dir_all(&fresh);
        // A thin clone target is cloned beside the old data while the old state is kept:
        // the two touch different files.
        let (kept, cloned) = match &interrupted {
            Some(id) => {
                let kept = zenith::resolve(store.as_ref(), id).await.map_err(|e| {
                    OpError::Conflict(format!(
                        "pg {name}'s data is incomplete and the snapshot that held its state is unreadable ({e}); to give that state up, delete {} and run the checkout again",
                        node.incomplete_marker().display()
                    ))
                })?;
                (kept, None)
            }
            None if target.clone => {
                let quiet = ProgressHandle::default();
                let (kept, cloned) = tokio::join!(
                    self.keep_head(node, state, progress.clone()),
                    self.materialize(target, &fresh, &quiet)
                );
                match kept {
                    Ok(kept) => (kept, Some(cloned)),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&fresh);
                        return Err(e);
                    }
                }
            }
            None => (self.keep_head(node, state, progress.clone()).await?, None),
        };
        progress.next_phase();
        // A thin clone target is cloned beside the old data, and one kept as a clone has no
        // blocks to take over: both leave the old data untouched.
        let untouched = interrupted.is_none() && (target.clone || kept.clone);
        let restored = if let Some(cloned) = cloned {
            cloned
        } else if interrupted.is_some() || untouched {
            self.materialize(target, &fresh, &progress).await
        } else {
            // The new data next to the old, swapped only when complete. Files move over
            // from the old data, which the kept snapshot holds, and only the blocks that
            // differ are written. Until the swap, the old data is marked incomplete: it may
            // have lost files to the new.
            mark_incomplete(node, Some(&kept))?;
            let basis = zenith::Basis {
                dir: &node.data(),
                manifest: &kept,
            };
            zenith::unpack_over(store.as_ref(), target, &fresh, basis, &progress)
                .await
                .map(|_| ())
                .map_err(OpError::from)
        };
        if let Err(e) = restored {
            if untouched {
                let _ = std::fs::remove_dir_all(&fresh);
                return Err(e);
            }
            // The old data lost files to the attempt: it comes back from the kept snapshot.
            tracing::error!("checkout of pg {name} failed: {e}; restoring {}", kept.id);
            let _ = std::fs::remove_dir_all(&fresh);
            let back = self
                .materialize(&kept, &fresh, &ProgressHandle::default())
                .await
                .and_then(|()| swap_data(node, &fresh));
            if let Err(again) = back {
                let _ = std::fs::remove_dir_all(&fresh);
                return Err(OpError::Failed(format!(
                    "{}; putting the previous data back failed too ({}); once that is fixed, `zenith pg checkout {name} {}` restores it",
                    e.full_message(),
                    again.full_message(),
                    kept.id
                )));
            }
            return Err(e);
        }
        prepare_for_postgres(&fresh)?;
        if untouched {
            // Cut short between the swap's two renames, the pg would have no data: marked,
            // the next checkout knows where its state is.
            mark_incomplete(node, Some(&kept))?;
        }
        swap_data(node, &fresh)?;
        // Its WAL goes on from the target's, as a history of its own.
        state.wal = Some(wal_line_from(target));
        state.recovery = None;
        node.save_state(state)?;
        Ok(kept)
    }

    /// Refuses to delete the snapshot that holds the state of a pg a checkout left
    /// incomplete.
    pub fn refuse_needed(&self, id: &str) -> OpResult<()> {
        for node in self.repo.nodes() {
            if incomplete(&node).as_deref() == Some(id) {
                return Err(OpError::Conflict(format!(
                    "snapshot {id} holds the state of pg {name}, whose data a checkout left incomplete; `zenith pg checkout {name} {id}` puts it back first",
                    name = node.name
                )));
            }
        }
        Ok(())
    }
}
