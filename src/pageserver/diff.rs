//! `zenith snapshot diff A B`: which relations differ between two snapshots of one
//! cluster, and by how many pages, without restoring either. Files with the same block
//! list (or, for a repo's thin clones, cloned from the same unchanged original) are equal
//! without being read; the others are compared block by block through their block lists,
//! or, between two clones, by where their blocks lie on disk (a block both still share is
//! equal unread; only the others are read and compared). A clone against a packed
//! snapshot hashes the clone's file. Names come from each snapshot's own
//! catalog files (`pg_database`, `pg_class`, `pg_namespace`), the only files restored, into
//! a temporary directory: a relation dropped since A is named from A's catalog.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::models::{FileChange, OpError, OpResult, RelationChange, SnapshotDiff};
use crate::snapshot::relations::{self, PG_CLASS, PG_DATABASE, PG_NAMESPACE};
use crate::snapshot::{join_error, zenith, Entry, EntryKind, Manifest, BLOCK_SIZE};
use crate::storage::Storage;
use crate::util::progress::ProgressHandle;
use crate::util::tempdir::TempDir;

type Hash = [u8; 32];

/// One snapshot and where its files are: a repo's clone directory, or packs in `storage`.
struct Side<'a> {
    m: &'a Manifest,
    clone: Option<PathBuf>,
}

/// Compares snapshot `a` with the newer `b`, both of `storage`; `repo` is the pageserver
/// whose store `storage` is, for thin clones.
pub async fn diff(
    storage: &dyn Storage,
    a: &Manifest,
    b: &Manifest,
    repo: Option<&super::Pageserver>,
) -> OpResult<SnapshotDiff> {
    if a.system_identifier != b.system_identifier {
        return Err(OpError::BadRequest(format!(
            "snapshots {} and {} are of different clusters (system identifiers {} and {}); a diff compares two snapshots of one",
            a.id, b.id, a.system_identifier, b.system_identifier
        )));
    }
    let (sa, sb) = (side_of(a, repo), side_of(b, repo));
    let work =
        TempDir::new("zenith-diff").map_err(|e| OpError::io(std::env::temp_dir().display(), e))?;
    let files = |m: &Manifest| -> HashMap<String, Entry> {
        m.entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| (e.path.clone(), e.clone()))
            .collect()
    };
    let (fa, fb) = (files(a), files(b));
    // Pages either snapshot's WAL changes when it is restored: its files may not hold them
    // yet (a state kept without a shutdown checkpoint, an online snapshot's backup).
    let replay = {
        let (ra, rb) = (replayed(&sa, &sb), replayed(&sb, &sa));
        tokio::task::spawn_blocking(move || -> OpResult<HashMap<String, HashSet<u64>>> {
            let mut all = ra()?;
            for (path, blocks) in rb()? {
                all.entry(path).or_default().extend(blocks);
            }
            Ok(all)
        })
        .await
        .map_err(join_error)??
    };
    // Per file: pages changed, pages in the newer (or older, when removed), and how.
    let mut changes: Vec<(String, u64, u64, &'static str)> = Vec::new();
    let mut compare: Vec<String> = Vec::new();
    let mut unread: Vec<String> = Vec::new();
    for (path, eb) in &fb {
        match fa.get(path) {
            None => changes.push((path.clone(), eb.block_count(), eb.block_count(), "added")),
            Some(ea) if same(ea, eb, &sa, &sb) => unread.push(path.clone()),
            Some(_) => compare.push(path.clone()),
        }
    }
    for (path, ea) in &fa {
        if !fb.contains_key(path) {
            changes.push((path.clone(), ea.block_count(), ea.block_count(), "removed"));
        }
    }
    // Per file compared: the blocks that differ, and its pages in the newer snapshot.
    let mut differing: Vec<(String, Vec<u64>, u64)> = Vec::new();
    if let (Some(da), Some(db)) = (sa.clone.clone(), sb.clone.clone()) {
        // Two clones: blocks that still share one place on disk are equal unread.
        differing = tokio::task::spawn_blocking(move || {
            compare
                .into_iter()
                .map(|path| {
                    let (x, y) = (da.join(&path), db.join(&path));
                    let n = crate::util::reflink::differing_blocks(&x, &y, BLOCK_SIZE)
                        .map_err(|e| OpError::io(y.display(), e))?;
                    let pages = std::fs::metadata(&y).map(|m| m.len()).unwrap_or(0);
                    Ok((path, n, pages.div_ceil(BLOCK_SIZE)))
                })
                .collect::<OpResult<Vec<_>>>()
        })
        .await
        .map_err(join_error)??;
    } else {
        let ha = hashes(storage, &sa, &compare).await?;
        let hb = hashes(storage, &sb, &compare).await?;
        for path in compare {
            let (x, y) = (&ha[&path], &hb[&path]);
            let blocks = (0..x.len().max(y.len()) as u64)
                .filter(|&i| x.get(i as usize) != y.get(i as usize))
                .collect();
            differing.push((path, blocks, y.len() as u64));
        }
    }
    // Files equal on disk may still differ by what their WAL replays.
    differing.extend(unread.into_iter().map(|path| {
        let pages = fb[&path].block_count();
        (path, Vec::new(), pages)
    }));
    for (path, blocks, pages) in differing {
        let mut changed: HashSet<u64> = blocks.into_iter().collect();
        if let Some(replayed) = replay.get(&path) {
            changed.extend(replayed);
        }
        if !changed.is_empty() {
            changes.push((path, changed.len() as u64, pages, "changed"));
        }
    }
    let names_b = catalog(storage, &sb, work.path(), "b").await?;
    let names_a = catalog(storage, &sa, work.path(), "a").await?;
    Ok(summarize(changes, &names_a, &names_b, a, b))
}

/// The blocks, by file, that replaying a clone's WAL (from its start to its stop
/// position) changes, leaving out the WAL `other` replays too (the same history's WAL
/// over the same positions changes both alike); none for a packed snapshot (its WAL is
/// not at hand) or a clean shutdown's.
fn replayed(side: &Side, other: &Side) -> impl FnOnce() -> OpResult<HashMap<String, HashSet<u64>>> {
    let range = lsn_range(side.m);
    let shared = (side.m.wal_history.is_some()
        && side.m.wal_history == other.m.wal_history
        && side.m.timeline == other.m.timeline)
        .then(|| lsn_range(other.m))
        .flatten();
    let wal = side.clone.as_ref().map(|dir| dir.join("pg_wal"));
    move || {
        let mut by_file: HashMap<String, HashSet<u64>> = HashMap::new();
        let (Some(wal), Some((from, to))) = (wal, range) else {
            return Ok(by_file);
        };
        let unshared = |lsn: u64| shared.is_none_or(|(a, b)| lsn < a || lsn >= b);
        let touched = crate::compute::wal_end::touched_blocks(&wal, from, to, unshared)
            .map_err(|e| OpError::Failed(format!("reading the WAL a snapshot replays: {e}")))?;
        for (path, block) in touched.iter().filter_map(|r| r.file()) {
            by_file.entry(path).or_default().insert(block);
        }
        Ok(by_file)
    }
}

/// The WAL a snapshot's restore replays: from its start to its stop position.
fn lsn_range(m: &Manifest) -> Option<(u64, u64)> {
    use crate::compute::wal::parse_lsn;
    let (from, to) = (parse_lsn(&m.start_lsn)?, parse_lsn(&m.stop_lsn)?);
    (from < to).then_some((from, to))
}

fn side_of<'a>(m: &'a Manifest, repo: Option<&super::Pageserver>) -> Side<'a> {
    let clone = repo
        .filter(|_| m.clone)
        .map(|ps| ps.clones_dir().join(&m.id));
    Side { m, clone }
}

/// Equal without reading: the same block list, or clones of one unchanged original.
fn same(ea: &Entry, eb: &Entry, sa: &Side, sb: &Side) -> bool {
    if ea.size != eb.size {
        return false;
    }
    if ea.size == 0 {
        return true;
    }
    match (&ea.list, &eb.list) {
        (Some(x), Some(y)) => x == y,
        _ => sa.clone.is_some() && sb.clone.is_some() && ea.stamp.is_some() && ea.stamp == eb.stamp,
    }
}

/// The block hashes of `paths` in one snapshot.
async fn hashes(
    storage: &dyn Storage,
    side: &Side<'_>,
    paths: &[String],
) -> OpResult<HashMap<String, Vec<Hash>>> {
    if let Some(dir) = &side.clone {
        let (dir, paths) = (dir.clone(), paths.to_vec());
        return tokio::task::spawn_blocking(move || {
            let mut out = HashMap::new();
            for path in paths {
                let file = dir.join(&path);
                let bytes = std::fs::read(&file).map_err(|e| OpError::io(file.display(), e))?;
                let list = bytes
                    .chunks(BLOCK_SIZE as usize)
                    .map(|c| Sha256::digest(c).into())
                    .collect();
                out.insert(path, list);
            }
            Ok(out)
        })
        .await
        .map_err(join_error)?;
    }
    let wanted: HashSet<&str> = paths.iter().map(String::as_str).collect();
    let narrow = narrowed(side.m, &wanted);
    let lists = zenith::block_lists(storage, &narrow).await?;
    Ok(narrow
        .entries
        .iter()
        .zip(lists)
        .filter(|(e, _)| e.kind == EntryKind::File)
        .map(|(e, l)| (e.path.clone(), l.as_ref().clone()))
        .collect())
}

/// `m` with only the files `wanted` (and every directory, so they have their parents).
fn narrowed(m: &Manifest, wanted: &HashSet<&str>) -> Manifest {
    let mut narrow = m.clone();
    narrow
        .entries
        .retain(|e| e.kind == EntryKind::Dir || wanted.contains(e.path.as_str()));
    narrow.total_size = narrow.entries.iter().map(|e| e.size).sum();
    narrow
}

/// The contents of `paths` (those the snapshot has) of one snapshot.
async fn read_files(
    storage: &dyn Storage,
    side: &Side<'_>,
    paths: &[String],
    into: &Path,
) -> OpResult<HashMap<String, Vec<u8>>> {
    let present: HashSet<&str> = side
        .m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| e.path.as_str())
        .filter(|p| paths.iter().any(|w| w == p))
        .collect();
    let root = match &side.clone {
        Some(dir) => dir.clone(),
        None => {
            let narrow = narrowed(side.m, &present);
            zenith::unpack(storage, &narrow, into, &ProgressHandle::default()).await?;
            into.to_path_buf()
        }
    };
    let mut out = HashMap::new();
    for p in present {
        let file = root.join(p);
        out.insert(
            p.to_string(),
            std::fs::read(&file).map_err(|e| OpError::io(file.display(), e))?,
        );
    }
    Ok(out)
}

/// A relation file: its database (`None`: global) and file number.
type FileKey = (Option<u32>, u32);

/// A relation's schema, name and kind (`pg_class.relkind`).
type Named = (Option<String>, String, char);

/// What a snapshot's catalogs name: databases by oid, relations by file.
#[derive(Default)]
struct Names {
    databases: HashMap<u32, String>,
    relations: HashMap<FileKey, Named>,
}

async fn catalog(
    storage: &dyn Storage,
    side: &Side<'_>,
    work: &Path,
    tag: &str,
) -> OpResult<Names> {
    let dbs: Vec<u32> = side
        .m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Dir)
        .filter_map(|e| e.path.strip_prefix("base/")?.parse().ok())
        .collect();
    let maps_wanted: Vec<String> = std::iter::once("global/pg_filenode.map".to_string())
        .chain(dbs.iter().map(|d| format!("base/{d}/pg_filenode.map")))
        .collect();
    let maps = read_files(storage, side, &maps_wanted, &work.join(format!("{tag}1"))).await?;
    let map_of = |path: &str| {
        maps.get(path)
            .map(|b| relations::relmap(b))
            .unwrap_or_default()
    };
    let global = map_of("global/pg_filenode.map");
    let db_maps: HashMap<u32, HashMap<u32, u32>> = dbs
        .iter()
        .map(|d| (*d, map_of(&format!("base/{d}/pg_filenode.map"))))
        .collect();
    let node = |map: &HashMap<u32, u32>, oid: u32| map.get(&oid).copied().unwrap_or(oid);
    let pg_database = format!("global/{}", node(&global, PG_DATABASE));
    let mut wanted = vec![pg_database.clone()];
    wanted.extend(
        dbs.iter()
            .map(|d| format!("base/{d}/{}", node(&db_maps[d], PG_CLASS))),
    );
    let heaps = read_files(storage, side, &wanted, &work.join(format!("{tag}2"))).await?;
    let mut names = Names {
        databases: heaps
            .get(&pg_database)
            .map(|b| relations::databases(b))
            .unwrap_or_default(),
        ..Names::default()
    };
    let classes: HashMap<u32, Vec<relations::Class>> = dbs
        .iter()
        .map(|d| {
            let path = format!("base/{d}/{}", node(&db_maps[d], PG_CLASS));
            (
                *d,
                heaps
                    .get(&path)
                    .map(|b| relations::classes(b))
                    .unwrap_or_default(),
            )
        })
        .collect();
    let ns_wanted: Vec<String> = dbs
        .iter()
        .filter_map(|d| {
            let ns = classes[d].iter().find(|c| c.oid == PG_NAMESPACE)?;
            let filenode = if ns.filenode != 0 {
                ns.filenode
            } else {
                node(&db_maps[d], PG_NAMESPACE)
            };
            Some(format!("base/{d}/{filenode}"))
        })
        .collect();
    let nss = read_files(storage, side, &ns_wanted, &work.join(format!("{tag}3"))).await?;
    for d in &dbs {
        let schemas = ns_wanted
            .iter()
            .find(|p| p.starts_with(&format!("base/{d}/")))
            .and_then(|p| nss.get(p))
            .map(|b| relations::namespaces(b))
            .unwrap_or_default();
        for c in &classes[d] {
            let schema = schemas.get(&c.namespace).cloned();
            let named = (schema, c.name.clone(), c.kind);
            match (c.filenode, global.get(&c.oid), db_maps[d].get(&c.oid)) {
                (0, Some(&g), _) => {
                    names.relations.insert((None, g), named);
                }
                (0, None, Some(&local)) => {
                    names.relations.insert((Some(*d), local), named);
                }
                (0, None, None) => {}
                (f, _, _) => {
                    // A shared catalog's file is in global/; any database's row names it.
                    names.relations.insert((Some(*d), f), named.clone());
                    names.relations.entry((None, f)).or_insert(named);
                }
            }
        }
    }
    Ok(names)
}

fn summarize(
    changes: Vec<(String, u64, u64, &'static str)>,
    names_a: &Names,
    names_b: &Names,
    a: &Manifest,
    b: &Manifest,
) -> SnapshotDiff {
    let mut relations: HashMap<FileKey, (RelationChange, HashSet<&'static str>)> = HashMap::new();
    let mut other_files = Vec::new();
    for (path, changed, pages, how) in changes {
        let Some(key) = relations::relation_file(&path) else {
            other_files.push(FileChange {
                path,
                change: how.to_string(),
                pages_changed: changed,
            });
            continue;
        };
        let names = if how == "removed" { names_a } else { names_b };
        let (schema, name, kind) = names
            .relations
            .get(&key)
            .or_else(|| names_a.relations.get(&key))
            .cloned()
            .unwrap_or((None, format!("file {}", key.1), '?'));
        let database = match key.0 {
            None => "global".to_string(),
            Some(oid) => names
                .databases
                .get(&oid)
                .or_else(|| names_a.databases.get(&oid))
                .cloned()
                .unwrap_or_else(|| format!("database {oid}")),
        };
        let entry = relations.entry(key).or_insert_with(|| {
            (
                RelationChange {
                    database,
                    schema,
                    name,
                    kind: relations::kind_word(kind).to_string(),
                    change: String::new(),
                    pages_changed: 0,
                    pages: 0,
                    bytes_changed: 0,
                },
                HashSet::new(),
            )
        });
        entry.0.pages_changed += changed;
        entry.0.pages += pages;
        entry.0.bytes_changed += changed * BLOCK_SIZE;
        entry.1.insert(how);
    }
    let mut relations: Vec<RelationChange> = relations
        .into_values()
        .map(|(mut r, hows)| {
            r.change = match (hows.len(), hows.iter().next()) {
                (1, Some(&only)) => only.to_string(),
                _ => "changed".to_string(),
            };
            r
        })
        .collect();
    relations.sort_by(|x, y| {
        y.pages_changed
            .cmp(&x.pages_changed)
            .then_with(|| (&x.database, &x.schema, &x.name).cmp(&(&y.database, &y.schema, &y.name)))
    });
    other_files.sort_by(|x, y| x.path.cmp(&y.path));
    SnapshotDiff {
        from: a.id.clone(),
        to: b.id.clone(),
        relations,
        other_files,
    }
}
