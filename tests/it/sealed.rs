//! Encrypted storages through the `zenith` binary: `storage encrypt`, a storage_dest that
//! holds snapshots and the WAL archive sealed, with no page of the database and no content
//! digest to be found in it (while a plain storage of the same snapshot has both); a
//! restore from it byte-identical to the original; pushes between encrypted and plain
//! storages; a new machine with only config.toml and the passphrase; a missing or wrong
//! passphrase and a flipped byte each refused in one line.

use std::path::{Path, PathBuf};

use crate::local::{connstr_of, eventually, ok, psql, z, TestRepo};
use crate::support::{assert_clean_failure, run};

const PASSPHRASE: &str = "correct horse battery staple";

/// `z(repo)` with the passphrase set.
fn zp(repo: &Path) -> std::process::Command {
    let mut cmd = z(repo);
    cmd.env("ZENITH_PASSPHRASE", PASSPHRASE);
    cmd
}

/// Every file under `dir`, with its path relative to `dir`.
fn files(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
            (rel, e.path().to_path_buf())
        })
        .collect();
    out.sort();
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A name segment that is a SHA-256 digest (perhaps with an extension).
fn is_digest(segment: &str) -> bool {
    let stem = segment.split('.').next().unwrap_or("");
    stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What the rows of table r hold.
fn rows(connstr: &str) -> String {
    psql(
        connstr,
        "select count(*) || '/' || md5(string_agg(b::text, ',' order by i)) from r",
    )
}

#[test]
fn an_encrypted_storage_holds_no_plaintext_and_restores_byte_identical() {
    let Some(a) = TestRepo::new() else {
        return;
    };
    let b = TestRepo::new().unwrap();
    let c = TestRepo::new().unwrap();
    let root = a.path.with_file_name("storages");
    let url = |name: &str| format!("file://{}", root.join(name).display());
    let (dest, plain) = (url("sealed"), url("plain"));

    // Encrypting needs the passphrase, and a storage that is still empty.
    assert_clean_failure(
        &run(z(&a.path).args(["storage", "encrypt", &dest])),
        "ZENITH_PASSPHRASE",
    );
    let out = ok(zp(&a.path).args(["storage", "encrypt", &dest]));
    assert!(out.contains("is encrypted"), "{out}");
    assert_clean_failure(
        &run(zp(&a.path).args(["storage", "encrypt", &dest])),
        "encrypted already",
    );

    ok(zp(&a.path).args(["init", "--storage_dest", &dest]));
    ok(zp(&a.path).arg("start"));
    let main = connstr_of(&a.path, "main");
    // Rows of pseudo-random bytes, which compression leaves as they are: a plain storage
    // shows them verbatim.
    psql(
        &main,
        "create table r (i int, b bytea); \
         insert into r select g, decode(string_agg(md5(g || '-' || k), '' order by k), 'hex') \
         from generate_series(1, 2000) g, generate_series(1, 30) k group by g",
    );
    let needle = hex::decode(psql(
        &main,
        "select encode(substr(b, 200, 48), 'hex') from r where i = 777",
    ))
    .unwrap();
    let before = rows(&main);
    ok(zp(&a.path).args(["snapshot", "create", "main@s1"]));
    let out = ok(zp(&a.path).args(["push", "main@s1"]));
    assert!(out.contains("(main@s1)"), "{out}");
    ok(zp(&a.path).args(["push", "main@s1", &plain]));
    psql(&main, "select pg_switch_wal()");
    let sealed_dir = root.join("sealed");
    eventually("no WAL reached the encrypted storage_dest", || {
        files(&sealed_dir)
            .iter()
            .any(|(rel, _)| rel.starts_with("wal/") && rel.ends_with(".zst"))
    });

    // The plain storage gives the page away and names blocks by content...
    let plain_files = files(&root.join("plain"));
    assert!(
        plain_files
            .iter()
            .any(|(_, p)| contains(&std::fs::read(p).unwrap(), &needle)),
        "the known bytes are not in the plain storage, so this test proves nothing"
    );
    assert!(plain_files
        .iter()
        .any(|(rel, _)| rel.split('/').any(is_digest)));
    // ...the encrypted one neither: every object sealed, snapshots and WAL alike.
    let sealed_files = files(&sealed_dir);
    assert!(sealed_files
        .iter()
        .any(|(rel, _)| rel.starts_with("packs/")));
    assert!(sealed_files
        .iter()
        .any(|(rel, _)| rel.starts_with("snapshots/")));
    for (rel, path) in &sealed_files {
        if rel == "zenith-key.json" {
            continue;
        }
        let data = std::fs::read(path).unwrap();
        assert!(data.starts_with(b"ZNSEAL01"), "{rel} is not sealed");
        assert!(!contains(&data, &needle), "{rel} holds a page in the clear");
        assert!(
            !rel.split('/').any(is_digest),
            "{rel} is named by a plain digest"
        );
    }
    let key = std::fs::read_to_string(sealed_dir.join("zenith-key.json")).unwrap();
    assert!(
        key.contains("argon2id") && !key.contains(PASSPHRASE),
        "{key}"
    );
    let shown = ok(zp(&a.path).args(["storage", "show", "-n", "storage_dest"]));
    assert!(shown.contains("(encrypted)"), "{shown}");

    // Another repo: without the passphrase, or with a wrong one, one line and nothing
    // pulled; with it, the snapshot restores byte for byte.
    ok(z(&b.path).arg("init"));
    assert_clean_failure(
        &run(z(&b.path).args(["pull", &dest, "main@s1"])),
        "ZENITH_PASSPHRASE",
    );
    assert_clean_failure(
        &run(z(&b.path)
            .env("ZENITH_PASSPHRASE", "wrong")
            .args(["pull", &dest, "main@s1"])),
        "passphrase does not open",
    );
    let listed = ok(z(&b.path).args(["snapshot", "list"]));
    assert!(!listed.contains("main@s1"), "{listed}");
    let pass_file = b.path.with_file_name("passphrase");
    std::fs::write(&pass_file, format!("{PASSPHRASE}\n")).unwrap();
    ok(z(&b.path)
        .env("ZENITH_PASSPHRASE_FILE", &pass_file)
        .args(["pull", &dest, "main@s1"]));
    let export = |repo: &Path, to: &str| {
        let dir = root.join(to);
        ok(z(repo).args([
            "export",
            "main@s1",
            "--snapshot-format",
            "pgdata",
            "--snapshot-path",
            &dir.display().to_string(),
        ]));
        files(&dir)
            .into_iter()
            .map(|(rel, p)| (rel, std::fs::read(p).unwrap()))
            .collect::<Vec<_>>()
    };
    let original = export(&a.path, "export-a");
    let restored = export(&b.path, "export-b");
    assert!(original.len() > 100, "{} files", original.len());
    assert_eq!(
        original.iter().map(|(rel, _)| rel).collect::<Vec<_>>(),
        restored.iter().map(|(rel, _)| rel).collect::<Vec<_>>()
    );
    for ((rel, x), (_, y)) in original.iter().zip(&restored) {
        // The export's own manifest has an id and a time of its own.
        if rel != "zenith-manifest.json" {
            assert!(
                x == y,
                "{rel} differs after the round trip through encryption"
            );
        }
    }
    ok(z(&b.path).args(["pg", "create", "copy", "--snapshot", "main@s1"]));
    assert_eq!(rows(&connstr_of(&b.path, "copy")), before);
    ok(z(&b.path).arg("stop"));

    // Encrypted to plain and plain to encrypted, storage to storage.
    let (out_plain, back_sealed) = (url("out-plain"), url("back-sealed"));
    ok(zp(&b.path).args(["push", "main@s1", &out_plain, "--from", &dest]));
    let verified = ok(z(&b.path).args(["snapshot", "verify", "main@s1", "--storage", &out_plain]));
    assert!(verified.contains("intact"), "{verified}");
    ok(zp(&b.path).args(["storage", "encrypt", &back_sealed]));
    ok(zp(&b.path).args(["push", "main@s1", &back_sealed, "--from", &out_plain]));
    let verified =
        ok(zp(&b.path).args(["snapshot", "verify", "main@s1", "--storage", &back_sealed]));
    assert!(verified.contains("intact"), "{verified}");

    // A new machine with only config.toml: refused without the passphrase, back with it.
    ok(zp(&a.path).arg("stop"));
    std::fs::create_dir_all(&c.path).unwrap();
    std::fs::copy(a.path.join("config.toml"), c.path.join("config.toml")).unwrap();
    let failed = run(z(&c.path).arg("start"));
    assert!(!failed.status.success());
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(said.contains("ZENITH_PASSPHRASE"), "{said}");
    let out = ok(zp(&c.path).arg("start"));
    assert!(out.contains("restored pg main"), "{out}");
    assert_eq!(rows(&connstr_of(&c.path, "main")), before);
    ok(zp(&c.path).arg("stop"));

    // A flipped byte in every pack fails authentication, and the error names the object
    // as it is stored.
    let packs: Vec<(String, PathBuf)> = files(&sealed_dir)
        .into_iter()
        .filter(|(rel, _)| rel.starts_with("packs/"))
        .collect();
    for (_, pack) in &packs {
        let mut data = std::fs::read(pack).unwrap();
        let middle = data.len() / 2;
        data[middle] ^= 0x01;
        std::fs::write(pack, data).unwrap();
    }
    let said = assert_clean_failure(
        &run(zp(&b.path).args(["snapshot", "verify", "main@s1", "--storage", &dest])),
        "fails authentication",
    );
    assert!(packs.iter().any(|(rel, _)| said.contains(rel)), "{said}");

    // A new passphrase wraps the same key: what is stored stays readable, with it only.
    assert_clean_failure(
        &run(zp(&b.path).args(["storage", "passphrase", &back_sealed])),
        "ZENITH_NEW_PASSPHRASE",
    );
    ok(zp(&b.path)
        .env("ZENITH_NEW_PASSPHRASE", "tr0ub4dor&3")
        .args(["storage", "passphrase", &back_sealed]));
    let verified = ok(z(&b.path).env("ZENITH_PASSPHRASE", "tr0ub4dor&3").args([
        "snapshot",
        "verify",
        "main@s1",
        "--storage",
        &back_sealed,
    ]));
    assert!(verified.contains("intact"), "{verified}");
    assert_clean_failure(
        &run(zp(&b.path).args(["snapshot", "list", "--storage", &back_sealed])),
        "passphrase does not open",
    );

    // The key file deleted (by whoever runs the storage): the repo that used the storage
    // remembers it was encrypted and writes nothing there in the clear.
    std::fs::remove_file(sealed_dir.join("zenith-key.json")).unwrap();
    let objects = files(&sealed_dir).len();
    ok(zp(&a.path).args(["snapshot", "create", "main@s2"]));
    assert_clean_failure(&run(zp(&a.path).args(["push", "main@s2"])), "key file");
    assert_eq!(
        files(&sealed_dir).len(),
        objects,
        "something was written in the clear"
    );
}
