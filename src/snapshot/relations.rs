//! Which relation a data file belongs to, read from the catalog files of a data directory
//! without a running server: `global/pg_database` names the databases, each database's
//! `pg_class` and `pg_namespace` name its tables, indexes and schemas, and
//! `pg_filenode.map` locates the catalogs whose files it maps. PostgreSQL 15's heap page
//! and tuple layout is parsed directly.
//!
//! Visibility cannot be decided without the commit log: a tuple whose inserting
//! transaction is known to have aborted is skipped, and where several tuples claim one
//! file, one not deleted wins. Every read is bounds-checked: a damaged page yields fewer
//! names, never a panic.

use std::collections::HashMap;

/// PostgreSQL's page size.
const PAGE: usize = 8192;
/// `pg_class`, `pg_database` and `pg_namespace`'s oids.
pub const PG_CLASS: u32 = 1259;
pub const PG_DATABASE: u32 = 1262;
pub const PG_NAMESPACE: u32 = 2615;
/// `RELMAPPER_FILEMAGIC`.
const RELMAP_MAGIC: u32 = 0x0059_2717;

const HEAP_XMIN_COMMITTED: u16 = 0x0100;
const HEAP_XMIN_INVALID: u16 = 0x0200;
const HEAP_XMAX_INVALID: u16 = 0x0800;
const HEAP_XMAX_LOCK_ONLY: u16 = 0x0080;

/// A tuple's data and whether it may still be current (not deleted).
struct Tuple<'a> {
    data: &'a [u8],
    current: bool,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A `name` column (64 bytes, NUL-padded) at `at`.
fn name_at(b: &[u8], at: usize) -> Option<String> {
    let raw = b.get(at..at + 64)?;
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

/// The tuples of every page of a heap file whose inserting transaction did not abort.
fn tuples(file: &[u8]) -> Vec<Tuple<'_>> {
    let mut out = Vec::new();
    for page in file.chunks(PAGE).filter(|p| p.len() == PAGE) {
        let (Some(lower), Some(upper)) = (u16_at(page, 12), u16_at(page, 14)) else {
            continue;
        };
        let (lower, upper) = (lower as usize, upper as usize);
        if lower < 24 || lower > upper || upper > PAGE {
            continue; // new, empty or damaged
        }
        for at in (24..lower).step_by(4) {
            let Some(lp) = u32_at(page, at) else { break };
            let (off, flags, len) = ((lp & 0x7fff) as usize, (lp >> 15) & 3, (lp >> 17) as usize);
            if flags != 1 || len < 23 || off + len > PAGE {
                continue; // unused, redirect, dead, or out of bounds
            }
            let tuple = &page[off..off + len];
            let (Some(mask), Some(&hoff)) = (u16_at(tuple, 20), tuple.get(22)) else {
                continue;
            };
            // Both bits set means frozen (committed long ago); XMIN_INVALID alone, aborted.
            let aborted = mask & (HEAP_XMIN_COMMITTED | HEAP_XMIN_INVALID) == HEAP_XMIN_INVALID;
            if aborted || (hoff as usize) > len {
                continue;
            }
            let current = mask & HEAP_XMAX_INVALID != 0 || mask & HEAP_XMAX_LOCK_ONLY != 0;
            out.push(Tuple {
                data: &tuple[hoff as usize..],
                current,
            });
        }
    }
    out
}

/// Keeps, per key, a current tuple's value over one that may have been deleted.
fn insert_preferring_current<K: std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, (V, bool)>,
    key: K,
    value: V,
    current: bool,
) {
    match map.get(&key) {
        Some((_, true)) if !current => {}
        _ => {
            map.insert(key, (value, current));
        }
    }
}

/// `pg_filenode.map`: mapped catalog oid → file number.
pub fn relmap(file: &[u8]) -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    if u32_at(file, 0) != Some(RELMAP_MAGIC) {
        return out;
    }
    let count = u32_at(file, 4).unwrap_or(0).min(64) as usize;
    for i in 0..count {
        if let (Some(oid), Some(node)) = (u32_at(file, 8 + i * 8), u32_at(file, 12 + i * 8)) {
            out.insert(oid, node);
        }
    }
    out
}

/// `pg_database`: database oid → name.
pub fn databases(file: &[u8]) -> HashMap<u32, String> {
    let mut found = HashMap::new();
    for t in tuples(file) {
        if let (Some(oid), Some(name)) = (u32_at(t.data, 0), name_at(t.data, 4)) {
            insert_preferring_current(&mut found, oid, name, t.current);
        }
    }
    found.into_iter().map(|(k, (v, _))| (k, v)).collect()
}

/// `pg_namespace`: schema oid → name.
pub fn namespaces(file: &[u8]) -> HashMap<u32, String> {
    databases(file) // the same layout: oid, then a name
}

/// One row of `pg_class`, as far as naming files goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    pub oid: u32,
    pub name: String,
    pub namespace: u32,
    /// 0 for a mapped catalog (see [`relmap`]).
    pub filenode: u32,
    /// `r` table, `i` index, `t` TOAST table, `m` materialized view, `S` sequence ...
    pub kind: char,
}

/// `pg_class`'s rows, by oid.
pub fn classes(file: &[u8]) -> Vec<Class> {
    let mut found: HashMap<u32, (Class, bool)> = HashMap::new();
    for t in tuples(file) {
        let d = t.data;
        let (Some(oid), Some(name), Some(namespace), Some(filenode), Some(&kind)) = (
            u32_at(d, 0),
            name_at(d, 4),
            u32_at(d, 68),
            u32_at(d, 88),
            d.get(115),
        ) else {
            continue;
        };
        let class = Class {
            oid,
            name,
            namespace,
            filenode,
            kind: kind as char,
        };
        insert_preferring_current(&mut found, oid, class, t.current);
    }
    found.into_values().map(|(c, _)| c).collect()
}

/// What kind of relation `kind` is, in words.
pub fn kind_word(kind: char) -> &'static str {
    match kind {
        'r' => "table",
        'i' | 'I' => "index",
        't' => "toast",
        'm' => "matview",
        'S' => "sequence",
        'p' => "partitioned",
        _ => "relation",
    }
}

/// The relation file a data directory path belongs to: `(database oid or None for
/// global, file number)` for `base/<db>/<node>[_fork][.seg]` and `global/<node>...`.
pub fn relation_file(path: &str) -> Option<(Option<u32>, u32)> {
    let (db, file) = if let Some(rest) = path.strip_prefix("base/") {
        let (db, file) = rest.split_once('/')?;
        (Some(db.parse().ok()?), file)
    } else {
        (None, path.strip_prefix("global/")?)
    };
    let node = file.split(['_', '.']).next()?;
    if node.is_empty() || !node.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((db, node.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heap page holding `rows` (each a tuple's data), as PostgreSQL lays it out.
    fn page(rows: &[(Vec<u8>, u16)]) -> Vec<u8> {
        let mut p = vec![0u8; PAGE];
        let mut upper = PAGE;
        let lower = 24 + 4 * rows.len();
        for (i, (data, mask)) in rows.iter().enumerate() {
            let len = 24 + data.len();
            upper -= len;
            upper &= !7;
            let mut t = vec![0u8; 24];
            t[20..22].copy_from_slice(&mask.to_le_bytes());
            t[22] = 24;
            t.extend_from_slice(data);
            p[upper..upper + len].copy_from_slice(&t);
            let lp = (upper as u32) | (1 << 15) | ((len as u32) << 17);
            p[24 + 4 * i..28 + 4 * i].copy_from_slice(&lp.to_le_bytes());
        }
        p[12..14].copy_from_slice(&(lower as u16).to_le_bytes());
        p[14..16].copy_from_slice(&(upper as u16).to_le_bytes());
        p
    }

    fn named(oid: u32, name: &str) -> Vec<u8> {
        let mut d = oid.to_le_bytes().to_vec();
        let mut n = name.as_bytes().to_vec();
        n.resize(64, 0);
        d.extend(n);
        d
    }

    #[test]
    fn reads_names_and_prefers_rows_not_deleted() {
        let file = page(&[
            (named(5, "old_name"), 0),
            (named(5, "postgres"), HEAP_XMAX_INVALID),
            (named(7, "aborted"), HEAP_XMIN_INVALID | HEAP_XMAX_INVALID),
            (
                named(1, "frozen"),
                HEAP_XMIN_COMMITTED | HEAP_XMIN_INVALID | HEAP_XMAX_INVALID,
            ),
        ]);
        let dbs = databases(&file);
        assert_eq!(dbs.get(&5).map(String::as_str), Some("postgres"));
        assert!(!dbs.contains_key(&7));
        assert_eq!(dbs.get(&1).map(String::as_str), Some("frozen"));
    }

    #[test]
    fn reads_pg_class_rows() {
        let mut d = named(16384, "t");
        d.resize(116, 0);
        d[68..72].copy_from_slice(&2200u32.to_le_bytes());
        d[88..92].copy_from_slice(&16390u32.to_le_bytes());
        d[115] = b'r';
        let rows = classes(&page(&[(d, HEAP_XMAX_INVALID)]));
        assert_eq!(
            rows,
            vec![Class {
                oid: 16384,
                name: "t".into(),
                namespace: 2200,
                filenode: 16390,
                kind: 'r'
            }]
        );
    }

    #[test]
    fn damaged_pages_and_odd_paths_yield_nothing() {
        let mut p = vec![0xffu8; PAGE];
        p[12..14].copy_from_slice(&30u16.to_le_bytes());
        p[14..16].copy_from_slice(&40u16.to_le_bytes());
        assert!(databases(&p).is_empty());
        assert!(classes(&[1, 2, 3]).is_empty());
        assert!(relmap(&[0; 3]).is_empty());
        assert_eq!(relation_file("base/5/16390_fsm"), Some((Some(5), 16390)));
        assert_eq!(relation_file("base/5/16390.2"), Some((Some(5), 16390)));
        assert_eq!(relation_file("global/1262"), Some((None, 1262)));
        assert_eq!(relation_file("base/5/pg_filenode.map"), None);
        assert_eq!(relation_file("pg_wal/000000010000000000000001"), None);
    }
}
