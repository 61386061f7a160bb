//! The pgs zenith-local runs: create (empty or from a snapshot), start (also as a
//! streaming replica), stop, promote, destroy, and roll back with `pg checkout`. One
//! implementation for zenith-local, which supervises every pg it starts, and for a
//! command run while zenith-local is down, whose pgs run on unsupervised. What happens to
//! a pg's data (snapshots, restores, the checkout swap) is the pageserver's.

use std::sync::Arc;

use super::archiving;
use super::replica;
use super::supervisor::Supervisor;
use crate::compute::node::{Node, NodeState, Status, WalLine};
use crate::compute::PgInstall;
use crate::models::{CheckoutReport, NewPg, OpError, OpResult, PgInfo, Role};
use crate::pageserver::{check_name, refuse_incomplete, swap_data, Pageserver, Repo};
use crate::util::progress::ProgressHandle;

use crate::pageserver::install;

/// How the operations run: in zenith-local, which supervises the pgs it starts, or in a
/// command run while zenith-local is down.
#[derive(Clone)]
pub struct Ops {
    pub pageserver: Pageserver,
    supervisor: Option<Arc<Supervisor>>,
}

/// A pg as `pg show --json` and `GET /pgs/NAME` describe it.
pub fn describe(node: &Node, state: &NodeState) -> PgInfo {
    PgInfo {
        name: node.name.clone(),
        status: node.status(),
        port: state.port,
        connstr: node.connstr(state),
        role: if state.primary.is_some() {
            Role::Replica
        } else {
            Role::Primary
        },
        primary: state.primary.clone(),
        data_directory: node.data(),
        log: node.log(),
    }
}

/// The main pg of a new repo: a new cluster.
pub fn init_main(repo: &Repo, install: &PgInstall) -> OpResult<NodeState> {
    let config = repo.config()?;
    // Settings zenith-local reads again later are checked before anything starts.
    config.check()?;
    let main = repo.node("main");
    let port = crate::util::port::free_port(config.pg_port).map_err(OpError::Failed)?;
    Ok(main.init(install, port)?)
}

impl Ops {
    /// Operations in zenith-local, which supervises every pg they start.
    pub fn supervised(pageserver: Pageserver, supervisor: Arc<Supervisor>) -> Ops {
        Ops {
            pageserver,
            supervisor: Some(supervisor),
        }
    }

    /// Operations in a command while zenith-local is down.
    pub fn direct(repo: Repo) -> Ops {
        Ops {
            pageserver: Pageserver::new(repo),
            supervisor: None,
        }
    }

    pub fn repo(&self) -> &Repo {
        &self.pageserver.repo
    }

    /// Starts a pg: under zenith-local's supervision, or left running on its own, reaped
    /// by a background task while this process lives and by init after.
    async fn run_node(&self, node: &Node, state: &mut NodeState) -> OpResult<()> {
        refuse_incomplete(node)?;
        match &self.supervisor {
            Some(s) => s.start(node, state).await,
            None => {
                if node.status() == Status::Running {
                    return Ok(());
                }
                let mut child =
                    super::supervisor::launch(&self.pageserver, &install()?, node, state).await?;
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                Ok(())
            }
        }
    }

    async fn halt_node(&self, node: &Node, immediate: bool) -> OpResult<()> {
        if let Some(s) = &self.supervisor {
            if s.stop(&node.name, immediate).await {
                return Ok(());
            }
        }
        Ok(node.stop(immediate).await?)
    }

    pub fn list_pgs(&self) -> OpResult<Vec<PgInfo>> {
        let mut rows = Vec::new();
        for node in self.repo().nodes().into_iter().filter(|n| n.exists()) {
            let state = node.state()?;
            rows.push(describe(&node, &state));
        }
        Ok(rows)
    }

    pub fn show_pg(&self, name: &str) -> OpResult<PgInfo> {
        let (node, state) = self.pageserver.existing(name)?;
        Ok(describe(&node, &state))
    }

    /// Creates a pg, empty or from a snapshot of the repo; started unless asked not to.
    pub async fn create_pg(&self, new: &NewPg, progress: ProgressHandle) -> OpResult<PgInfo> {
        let name = new.name.as_str();
        check_name(name)?;
        let _held = self.pageserver.hold(name).await;
        let node = self.repo().node(name);
        if node.dir.exists() {
            return Err(OpError::Conflict(format!(
                "pg {name:?} already exists; nothing was changed (`zenith pg destroy {name}` removes it)"
            )));
        }
        let install = install()?;
        // A point in time: of which history, from which snapshot (refused before anything
        // is created when the archive cannot reach it).
        let pitr = match (&new.at, &new.snapshot) {
            (Some(_), Some(_)) => {
                return Err(OpError::BadRequest(
                    "give --snapshot or --at, not both: --at picks the snapshot itself".into(),
                ))
            }
            (Some(at), None) => Some(
                self.plan_pitr(new.from.as_deref().unwrap_or("main"), at)
                    .await?,
            ),
            (None, _) => None,
        };
        let port = self.pageserver.new_port()?;
        let created = async {
            let mut state = match (&pitr, &new.snapshot) {
                (Some((m, _)), _) => {
                    self.pageserver
                        .pg_from_snapshot(&node, port, &m.id, progress)
                        .await?
                }
                (None, Some(reference)) => {
                    self.pageserver
                        .pg_from_snapshot(&node, port, reference, progress)
                        .await?
                }
                (None, None) => node.init(&install, port)?,
            };
            if let Some((_, recovery)) = pitr {
                // A history of its own, whose beginning is known once recovery ends.
                state.wal = Some(WalLine {
                    history: crate::compute::node::new_history(),
                    parent: None,
                });
                node.begin_recovery(&mut state, recovery)?;
                self.run_node(&node, &mut state).await?;
                archiving::finish_recovery(&self.pageserver, &install, &node, &mut state).await?;
            } else if new.start {
                self.run_node(&node, &mut state).await?;
            }
            OpResult::Ok(state)
        }
        .await;
        match created {
            Ok(state) => Ok(describe(&node, &state)),
            Err(e) => {
                // Nothing of a pg that could not be made stays.
                let _ = self.halt_node(&node, true).await;
                let _ = std::fs::remove_dir_all(&node.dir);
                Err(e)
            }
        }
    }

    /// Runs the recovery pg `name` has due (replaying the WAL archive after a crash
    /// restore) to its end, then stops it; the WAL position it reached, if it had one due.
    pub async fn recover(&self, name: &str) -> OpResult<Option<String>> {
        let _held = self.pageserver.hold(name).await;
        let (node, mut state) = self.pageserver.existing(name)?;
        if state.recovery.is_none() {
            return Ok(None);
        }
        let install = install()?;
        self.run_node(&node, &mut state).await?;
        let recovered =
            archiving::finish_recovery(&self.pageserver, &install, &node, &mut state).await;
        let lsn = node
            .query(&install, &state, "SELECT pg_current_wal_lsn()")
            .await;
        self.halt_node(&node, false).await?;
        recovered?;
        Ok(Some(lsn?))
    }

    /// The snapshot and recovery that restore pg `from`'s line of history to `at`. A
    /// running `from` first archives what it wrote up to now (a commit, so a target just
    /// before now has a commit after it to stop at, and a segment switch).
    async fn plan_pitr(
        &self,
        from: &str,
        at: &str,
    ) -> OpResult<(crate::snapshot::Manifest, crate::compute::node::Recovery)> {
        let at = crate::pageserver::At::parse(at)?;
        let (source, sstate) = self.pageserver.existing(from)?;
        let history = sstate
            .wal
            .as_ref()
            .map(|w| w.history.clone())
            .ok_or_else(|| {
                OpError::BadRequest(format!(
                    "pg {from} has no WAL history yet: it gets one at its next start"
                ))
            })?;
        if source.status() == Status::Running && sstate.primary.is_none() {
            archiving::flush(&install()?, &source, &sstate).await?;
        }
        let sysid = crate::snapshot::datadir::read_control(&source.data())?.system_identifier;
        self.pageserver.plan_pitr(&history, sysid, at).await
    }

    /// `pg start`: as a primary, or (`replica`) as a streaming replica of `primary`
    /// (default main).
    pub async fn start_pg(
        &self,
        name: &str,
        replica: bool,
        primary: Option<&str>,
    ) -> OpResult<PgInfo> {
        let _held = self.pageserver.hold(name).await;
        if replica {
            return self.start_replica(name, primary.unwrap_or("main")).await;
        }
        let (node, mut state) = self.pageserver.existing(name)?;
        if state.primary.is_some() {
            return Err(OpError::Conflict(format!(
                "pg {name} is a replica; `zenith pg start {name} --replica` starts it, `zenith pg promote {name}` makes it a primary"
            )));
        }
        self.run_node(&node, &mut state).await?;
        Ok(describe(&node, &state))
    }

    /// `pg stop`.
    pub async fn stop_pg(&self, name: &str, immediate: bool) -> OpResult<PgInfo> {
        let _held = self.pageserver.hold(name).await;
        let (node, state) = self.pageserver.existing(name)?;
        self.halt_node(&node, immediate).await?;
        Ok(describe(&node, &state))
    }

    /// Starts `name` as a streaming replica of `primary`. A pg that is not its replica
    /// yet gets a fresh copy of the primary's data; what it held is kept first as
    /// snapshot `NAME@HEAD{n}`, unless it never ran (its data is then still the snapshot
    /// it was created from).
    async fn start_replica(&self, name: &str, primary: &str) -> OpResult<PgInfo> {
        let (node, mut state) = self.pageserver.existing(name)?;
        if name == primary {
            return Err(OpError::BadRequest(format!(
                "pg {name} cannot follow itself"
            )));
        }
        let (pnode, pstate) = self.pageserver.existing(primary)?;
        if state.primary.as_deref() == Some(primary) {
            self.run_node(&node, &mut state).await?;
            return Ok(describe(&node, &state));
        }
        if let Some(other) = &state.primary {
            return Err(OpError::Conflict(format!(
                "pg {name} follows pg {other}; `zenith pg promote {name}` first"
            )));
        }
        if pstate.primary.is_some() {
            return Err(OpError::BadRequest(format!(
                "pg {primary} is itself a replica; follow a primary instead"
            )));
        }
        refuse_followers(self.repo(), name, "")?;
        if pnode.status() != Status::Running {
            return Err(OpError::Conflict(format!(
                "pg {primary} is not running; `zenith pg start {primary}` first"
            )));
        }
        if name == "main" {
            return Err(OpError::BadRequest(
                "pg main is the repo's own pg and stays a primary; create a new pg for the replica"
                    .into(),
            ));
        }
        let install = install()?;
        self.halt_node(&node, false).await?;
        if state.has_run {
            let kept = self
                .pageserver
                .keep_head(&node, &state, Default::default())
                .await?;
            tracing::info!("pg {name}: kept its data as snapshot {}", kept.id);
        }
        let fresh = node.dir.join("data.replica");
        let _ = std::fs::remove_dir_all(&fresh);
        if let Err(e) = replica::copy_primary(&install, &pnode, &pstate, name, &fresh).await {
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(e);
        }
        swap_data(&node, &fresh)?;
        state.primary = Some(primary.to_string());
        // The copy carries the primary's roles and passwords; a replica is read-only.
        state.password = pstate.password.clone();
        // A history of its own from the start: when a promotion makes it a primary, it
        // archives into it at once, never into its primary's. Where it begins (the
        // primary's history, at the promotion) is known then.
        state.wal = Some(WalLine {
            history: crate::compute::node::new_history(),
            parent: None,
        });
        state.recovery = None;
        state.has_run = false;
        node.save_state(&state)?;
        self.run_node(&node, &mut state).await?;
        replica::wait_streaming(&install, &node, &state).await?;
        Ok(describe(&node, &state))
    }

    /// Makes a running replica a primary of its own (a new timeline); its primary drops
    /// the slot it kept for it.
    pub async fn promote_pg(&self, name: &str) -> OpResult<PgInfo> {
        let _held = self.pageserver.hold(name).await;
        let (node, mut state) = self.pageserver.existing(name)?;
        let Some(primary) = state.primary.clone() else {
            return Err(OpError::BadRequest(format!(
                "pg {name} is not a replica; there is nothing to promote"
            )));
        };
        if node.status() != Status::Running {
            return Err(OpError::Conflict(format!(
                "pg {name} is not running; `zenith pg start {name} --replica` first"
            )));
        }
        let install = install()?;
        let done = node
            .query(&install, &state, "SELECT pg_promote(true, 120)")
            .await?;
        if done != "t" {
            return Err(OpError::Failed(format!(
                "pg {name} did not finish its promotion in 120 s; see {}",
                node.log().display()
            )));
        }
        state.primary = None;
        state.has_run = true;
        // A primary now, on a new timeline: its own history continues its primary's from
        // the switch.
        let followed = self
            .repo()
            .node(&primary)
            .state()
            .ok()
            .and_then(|s| s.wal)
            .map(|w| w.history);
        let own = state
            .wal
            .as_ref()
            .map(|w| w.history.clone())
            .unwrap_or_else(crate::compute::node::new_history);
        state.wal = Some(match (followed, node.timeline_switch()) {
            (Some(h), Some((timeline, lsn))) => WalLine {
                history: own,
                parent: Some(crate::compute::node::WalFork {
                    history: h,
                    timeline,
                    lsn,
                }),
            },
            _ => WalLine {
                history: own,
                parent: None,
            },
        });
        node.save_state(&state)?;
        archiving::write_target(self.repo(), &node, &state)?;
        if let Some(line) = &state.wal {
            archiving::record_branch(&self.pageserver, &node, line).await?;
        }
        node.set_password(&install, &state).await?;
        let pnode = self.repo().node(&primary);
        if let Ok(pstate) = pnode.state() {
            if pnode.status() == Status::Running {
                replica::prune_slots(self.repo(), &install, &pnode, &pstate).await;
            }
        }
        Ok(describe(&node, &state))
    }

    pub async fn destroy_pg(&self, name: &str) -> OpResult<()> {
        let _held = self.pageserver.hold(name).await;
        let (node, state) = self.pageserver.existing(name)?;
        if name == "main" {
            return Err(OpError::Conflict(
                "pg main is the repo's own pg and is not destroyed; its snapshots stay in the repo"
                    .into(),
            ));
        }
        refuse_followers(self.repo(), name, "")?;
        self.halt_node(&node, true).await?;
        std::fs::remove_dir_all(&node.dir).map_err(|e| OpError::io(node.dir.display(), e))?;
        if let Some(primary) = &state.primary {
            let pnode = self.repo().node(primary);
            if let (Ok(pstate), Status::Running) = (pnode.state(), pnode.status()) {
                replica::prune_slots(self.repo(), &install()?, &pnode, &pstate).await;
            }
        }
        Ok(())
    }

    /// `pg checkout NAME REF`: keeps NAME's state as `NAME@HEAD{n}`, then replaces its
    /// data with REF and starts it again if it ran. Nothing is lost: the old state is a
    /// snapshot before anything is replaced, and an unknown REF changes nothing.
    pub async fn checkout(
        &self,
        name: &str,
        reference: Option<&str>,
        at: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<CheckoutReport> {
        let _held = self.pageserver.hold(name).await;
        let (node, mut state) = self.pageserver.existing(name)?;
        if state.primary.is_some() {
            return Err(OpError::Conflict(format!(
                "pg {name} is a replica and follows its primary; `zenith pg promote {name}` first"
            )));
        }
        refuse_followers(self.repo(), name, ", which cannot follow a rollback")?;
        let (target, recovery) = match (reference, at) {
            (Some(r), None) => (self.pageserver.show_snapshot(r).await?, None),
            (None, Some(at)) => {
                let (m, recovery) = self.plan_pitr(name, at).await?;
                (m, Some(recovery))
            }
            _ => {
                return Err(OpError::BadRequest(
                    "checkout needs a snapshot or --at TIME|LSN (one of them)".into(),
                ))
            }
        };
        let was_running = node.status() == Status::Running;
        let began = std::time::Instant::now();
        let phase =
            |what: &str| tracing::debug!("checkout of pg {name}: {what} at {:?}", began.elapsed());
        // A clone keeps the state the pg leaves as it is, crashed or not, so the pg stops
        // at once rather than write its dirty pages in a shutdown checkpoint (most of a
        // checkout's time after writes). The kept state is then consistent once its WAL
        // is replayed: the snapshot records where that WAL ends, and a pg made from it
        // replays it when it starts. Unlogged relations would be emptied by that
        // replay, and a pg in recovery has not reached its own end yet: those stop cleanly.
        let clones = self.pageserver.clone_mode().on;
        if was_running && clones {
            // The pg's files are cloned once it stops; what it wrote and the kernel has
            // not yet written out goes to disk meanwhile.
            let data = node.data();
            tokio::task::spawn_blocking(move || crate::util::reflink::start_writeback(&data));
        }
        // (Unlogged relations are looked for once the sessions are ended: none can
        // appear after that but from a new session in the moment before the stop.)
        let flushed = if was_running && state.recovery.is_none() && clones {
            flushed_for_immediate_stop(&node, &state).await
        } else {
            None
        };
        let at_once =
            flushed.is_some() && !crate::snapshot::datadir::has_unlogged_relations(&node.data());
        phase(if at_once {
            "flushed for an immediate stop"
        } else {
            "stopping cleanly"
        });
        self.halt_node(&node, at_once).await?;
        phase("stopped");
        if at_once {
            let found = wal_end_found(&node, flushed).await;
            phase("WAL end read");
            if let Err(e) = found {
                // The kept state could not say where it stands: a clean stop makes it
                // self-contained.
                tracing::warn!("pg {name}: {e}; starting it again to stop it cleanly");
                self.run_node(&node, &mut state).await?;
                self.halt_node(&node, false).await?;
            } else {
                // What the archiver would have sent in a clean stop's last round.
                archiving::archive_leftovers(&self.pageserver, &node).await;
                phase("leftover segments archived");
            }
        }
        let result = self
            .pageserver
            .checkout_stopped(&node, &mut state, &target, progress)
            .await;
        phase("state kept and target in place");
        if let (Ok(kept), Some(recovery)) = (&result, recovery) {
            // Replay the archive to the point in time, then run as a primary.
            state.wal = Some(WalLine {
                history: crate::compute::node::new_history(),
                parent: None,
            });
            node.begin_recovery(&mut state, recovery)?;
            let install = install()?;
            let recovered = async {
                self.run_node(&node, &mut state).await?;
                archiving::finish_recovery(&self.pageserver, &install, &node, &mut state).await
            }
            .await;
            if let Err(e) = recovered {
                return Err(OpError::Failed(format!(
                    "{}; pg {name}'s previous state is kept as {}: `zenith pg checkout {name} {}` puts it back",
                    e.full_message(),
                    kept.name.as_deref().unwrap_or(&kept.id),
                    kept.id
                )));
            }
            return Ok(CheckoutReport {
                kept: kept.summary(),
                target: target.summary(),
                pg: Some(describe(&node, &state)),
            });
        }
        // Failed or not, a pg that ran runs again (on its old data if nothing changed); a
        // failure to restart does not hide why the checkout failed.
        if was_running {
            let restarted = self.run_node(&node, &mut state).await;
            if let (Err(e), Err(again)) = (&result, &restarted) {
                tracing::error!(
                    "pg {name} did not start again after a failed checkout: {}",
                    again.full_message()
                );
                return Err(OpError::Failed(format!(
                    "{}; pg {name} did not start again: {}",
                    e.full_message(),
                    again.full_message()
                )));
            }
            restarted?;
            phase("started again");
        }
        let kept = result?;
        Ok(CheckoutReport {
            kept: kept.summary(),
            target: target.summary(),
            pg: was_running.then(|| describe(&node, &state)),
        })
    }
}

/// The WAL a pg may leave to be replayed at its next start, instead of writing its dirty
/// pages in a shutdown checkpoint: replaying much more would make that start slow (and a
/// start has two minutes).
const MAX_REPLAY: u64 = 512 << 20;

/// Prepares running `node` to stop without its shutdown checkpoint; whether it may. As a
/// clean stop would, it ends the client sessions (a commit either made it or is rolled
/// back), then commits a transaction that writes WAL (a logical decoding message, which
/// nothing reads) with a local flush: all WAL before it is written out, commits made with
/// `synchronous_commit = off` included. It waits (up to 2 s) for the safekeeper to have
/// stored that WAL, as a clean stop waits for its WAL senders. And the WAL since the last
/// checkpoint must be short enough to replay at the next start. Returns where the record
/// after that message begins (the WAL's end is searched from there).
async fn flushed_for_immediate_stop(node: &Node, state: &NodeState) -> Option<u64> {
    let wait_for_safekeeper = format!(
        "DO $$ DECLARE flushed pg_lsn := pg_current_wal_flush_lsn(); \
         deadline timestamptz := clock_timestamp() + interval '2 s'; BEGIN \
         WHILE clock_timestamp() < deadline AND EXISTS (SELECT 1 FROM pg_stat_replication \
         WHERE application_name = '{}' AND (flush_lsn IS NULL OR flush_lsn < flushed)) \
         LOOP PERFORM pg_sleep(0.002); END LOOP; END $$",
        crate::safekeeper::receiver::NAME
    );
    let steps = [
        "SET synchronous_commit = local",
        "SELECT count(pg_terminate_backend(pid, 1000)) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        "SELECT pg_logical_emit_message(true, 'zenith', 'checkout')",
        wait_for_safekeeper.as_str(),
        "SELECT (pg_current_wal_insert_lsn() - redo_lsn)::bigint FROM pg_control_checkpoint()",
    ];
    let install = install().ok()?;
    let limit = std::time::Duration::from_secs(10);
    match node.query_steps(&install, state, &steps, Some(limit)).await {
        Ok(out) => {
            // The message's LSN (its end, where the next record begins), then the WAL
            // since the checkpoint.
            let mut lines = out.lines().rev().map(str::trim);
            let since_checkpoint = lines.next()?.parse::<u64>().ok()?;
            let after = crate::compute::wal::parse_lsn(lines.next()?)?;
            (since_checkpoint <= MAX_REPLAY).then_some(after)
        }
        Err(e) => {
            tracing::info!("pg {}: stopping it cleanly ({e})", node.name);
            None
        }
    }
}

/// Checks that the WAL of `node`, stopped without its shutdown checkpoint, shows where
/// it ends (what its kept state records), searching from `after` (a record the server
/// flushed before it stopped).
async fn wal_end_found(node: &Node, after: Option<u64>) -> OpResult<()> {
    let data = node.data();
    tokio::task::spawn_blocking(move || {
        let mut control = crate::snapshot::datadir::read_control(&data)?;
        crate::snapshot::datadir::crash_lsns_after(&data, &mut control, after).map(|_| ())
    })
    .await
    .map_err(crate::snapshot::join_error)?
    .map_err(OpError::from)
}

/// Refuses to act on a pg that replicas follow (`why` says what they could not follow).
fn refuse_followers(repo: &Repo, name: &str, why: &str) -> OpResult<()> {
    let followers = replica::replicas_of(repo, name);
    if followers.is_empty() {
        return Ok(());
    }
    Err(OpError::Conflict(format!(
        "pg {name} has replicas ({}){why}; promote or destroy them first",
        followers.join(", ")
    )))
}
