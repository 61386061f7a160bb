//! `pg checkout` when things go wrong: killed halfway, or out of disk space. Either way
//! the pg's earlier state is never lost, and a pg whose data was left incomplete says so
//! instead of starting on it.

use std::path::Path;
use std::process::Command;

use crate::local::{connstr_of, ok, psql, z, TestRepo};
use crate::support::{assert_clean_failure, in_ci, run, text};

/// A table of about `mib` MiB that compresses poorly (md5 text of random numbers).
pub(crate) fn fill(connstr: &str, table: &str, mib: u32) {
    let rows = mib * 1024 * 1024 / 110;
    psql(
        connstr,
        &format!(
            "create table {table} (i int, pad text); \
             insert into {table} select g, md5(random()::text) || md5(random()::text) \
             from generate_series(1, {rows}) g; checkpoint"
        ),
    );
}

fn count(connstr: &str, table: &str) -> String {
    psql(connstr, &format!("select count(*) from {table}"))
}

#[test]
fn a_checkout_killed_halfway_leaves_a_pg_that_says_so_and_comes_back() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    // Without zenith-local, the checkout runs in the command itself: killing it kills
    // the checkout.
    ok(z(&repo.path).arg("init"));
    ok(z(&repo.path).args(["pg", "start", "main"]));
    let main = connstr_of(&repo.path, "main");
    fill(&main, "big", 150);
    ok(z(&repo.path).args(["snapshot", "create", "main@big"]));
    psql(
        &main,
        "drop table big; create table t (i int); insert into t values (7)",
    );

    let marker = repo.path.join("pgs/main/incomplete");
    let mut checkout = z(&repo.path)
        .args(["--no-progress", "pg", "checkout", "main", "main@big"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            checkout.try_wait().unwrap().is_none(),
            "the checkout ended before it could be killed halfway"
        );
        assert!(std::time::Instant::now() < deadline, "no restore began");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    checkout.kill().unwrap();
    checkout.wait().unwrap();

    // The data directory may have lost files to the killed restore: main does not start
    // on it, nor is it snapshotted, and both say what puts it back.
    let out = run(z(&repo.path).args(["pg", "start", "main"]));
    assert_clean_failure(&out, "pg checkout main main@HEAD{0}");
    assert_clean_failure(
        &run(z(&repo.path).args(["snapshot", "create", "main@broken"])),
        "incomplete",
    );
    assert!(!ok(z(&repo.path).args(["snapshot", "list"])).contains("main@broken"));
    // The snapshot that holds main's state is not deleted under it.
    assert_clean_failure(
        &run(z(&repo.path).args(["snapshot", "delete", "main@HEAD{0}"])),
        "puts it back first",
    );

    // The state the checkout kept is whole: checking it out brings back every row.
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@HEAD{0}"]));
    assert!(!marker.exists());
    ok(z(&repo.path).args(["pg", "start", "main"]));
    // Its port is the next free one if another process held the old one at the start.
    let main = connstr_of(&repo.path, "main");
    assert_eq!(psql(&main, "select array_agg(i) from t"), "{7}");
    // And the snapshot it was moving to is whole too.
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@big"]));
    let main = connstr_of(&repo.path, "main");
    assert_eq!(count(&main, "big"), (150 * 1024 * 1024 / 110).to_string());
    ok(z(&repo.path).args(["pg", "stop", "main"]));
}

/// A tmpfs of `mib` MiB at `dir`, unmounted when dropped.
pub(crate) struct SmallDisk {
    pub(crate) dir: std::path::PathBuf,
}

impl SmallDisk {
    pub(crate) fn mount(dir: &Path, mib: u32) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={mib}m,mode=0755"))
            .arg("tmpfs")
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk {
                dir: dir.to_path_buf(),
            }),
            other => {
                let why = match other {
                    Ok(o) => text(&o).1,
                    Err(e) => e.to_string(),
                };
                // The full-disk test needs root's mount; CI runs as root.
                assert!(!in_ci(), "cannot mount a small tmpfs under CI: {why}");
                eprintln!("SKIP: cannot mount a small tmpfs ({why})");
                None
            }
        }
    }

    pub(crate) fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.dir.to_string_lossy().as_bytes()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

#[test]
fn a_checkout_that_runs_out_of_disk_fails_cleanly_and_keeps_every_row() {
    let Some(outer) = TestRepo::new() else {
        return;
    };
    let Some(disk) = SmallDisk::mount(&outer.path.with_file_name("disk"), 400) else {
        return;
    };
    zenith::compute::hand_to_postgres_user(&disk.dir).unwrap();
    let repo = TestRepo::at(disk.dir.join("repo"));
    ok(z(&repo.path).arg("start"));
    let main = connstr_of(&repo.path, "main");
    fill(&main, "big", 60);
    ok(z(&repo.path).args(["snapshot", "create", "main@big"]));
    psql(
        &main,
        "drop table big; create table t (i int); insert into t values (7); checkpoint",
    );

    // Leave 30 MiB: enough to keep main's small state, not to write the 60 MiB table.
    let filler = disk.dir.join("filler");
    let keep = 30 * 1024 * 1024;
    let size = disk.free_bytes().saturating_sub(keep);
    let status = Command::new("fallocate")
        .args(["-l", &size.to_string()])
        .arg(&filler)
        .status()
        .unwrap();
    assert!(status.success());

    let out = run(z(&repo.path).args(["--no-progress", "pg", "checkout", "main", "main@big"]));
    let err = assert_clean_failure(&out, "free some space");
    eprintln!("checkout on a full disk: {err}");
    // The failure came in the restore, after main's state was kept: main's data came back
    // from main@HEAD{0}, and main runs on its own rows again.
    assert!(ok(z(&repo.path).args(["snapshot", "list"])).contains("main@HEAD{0}"));
    assert_eq!(psql(&main, "select array_agg(i) from t"), "{7}");
    assert!(!repo.path.join("pgs/main/incomplete").exists());
    assert!(!repo.path.join("pgs/main/data.checkout").exists());

    // With space again, the same checkout succeeds, and main@big was never damaged.
    std::fs::remove_file(&filler).unwrap();
    ok(z(&repo.path).args(["snapshot", "verify", "main@big"]));
    ok(z(&repo.path).args(["--no-progress", "pg", "checkout", "main", "main@big"]));
    assert_eq!(count(&main, "big"), (60 * 1024 * 1024 / 110).to_string());
    ok(z(&repo.path).arg("stop"));
}
