//! Looking inside snapshots: what `snapshot diff` prints, and `snapshot verify --boot`,
//! which starts a snapshot in a throwaway pg and reports what pg_amcheck finds.

use super::CliError;
use crate::local::Ops;
use crate::snapshot::Manifest;
use crate::storage::Storage;
use crate::util::message::printable;
use crate::util::size::format_size;

/// `verify --boot`: the snapshot restored into a throwaway pg, started, and checked by
/// pg_amcheck; problems are printed and make the command fail.
pub(super) async fn boot_check(
    m: &Manifest,
    storage: &dyn Storage,
    repo: Option<&Ops>,
) -> Result<(), CliError> {
    let install = crate::pageserver::install()?;
    let parent = match repo {
        Some(ops) => ops.pageserver.repo.tmp_dir(),
        None => std::env::temp_dir(),
    };
    let report = crate::pageserver::boot::boot_check(
        &install,
        storage,
        m,
        &parent,
        repo.map(|ops| &ops.pageserver),
    )
    .await?;
    if report.problems.is_empty() {
        println!(
            "snapshot {} boots, and pg_amcheck --heapallindexed found nothing in its {} database(s): {}",
            m.id,
            report.databases.len(),
            printable(&report.databases.join(", "))
        );
        return Ok(());
    }
    for line in &report.problems {
        println!("{}", printable(line));
    }
    Err(anyhow::anyhow!(
        "snapshot {} is damaged: pg_amcheck reported {} problem line(s), printed above; restore an earlier snapshot, or export this one and repair it by hand",
        m.id,
        report.problems.len()
    )
    .into())
}

pub(super) fn print_diff(d: &crate::models::SnapshotDiff) {
    if d.relations.is_empty() && d.other_files.is_empty() {
        println!("snapshots {} and {} hold the same data", d.from, d.to);
        return;
    }
    println!("from {} to {}:", d.from, d.to);
    if !d.relations.is_empty() {
        println!(
            "{:<48}  {:<11}  {:<8}  {:>15}  {:>10}",
            "RELATION", "KIND", "CHANGE", "PAGES CHANGED", "BYTES"
        );
        for r in &d.relations {
            let name = match &r.schema {
                Some(s) => format!("{}.{s}.{}", r.database, r.name),
                None => format!("{}.{}", r.database, r.name),
            };
            println!(
                "{:<48}  {:<11}  {:<8}  {:>15}  {:>10}",
                printable(&name),
                r.kind,
                r.change,
                format!("{} of {}", r.pages_changed, r.pages),
                format_size(r.bytes_changed)
            );
        }
    }
    if !d.other_files.is_empty() {
        println!("files outside relations:");
        for f in &d.other_files {
            println!(
                "  {:<46}  {:<8}  {} page(s)",
                printable(&f.path),
                f.change,
                f.pages_changed
            );
        }
    }
}
