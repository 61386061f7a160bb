//! Finding stock PostgreSQL binaries. Order, first match wins:
//! 1. `ZENITH_PG_BIN` (a bin directory; if set but wrong, that is an error, not a fallback);
//! 2. `pg_config --bindir`;
//! 3. `postgres` on `PATH` (symlinks resolved, so `initdb` is found beside the real binary);
//! 4. `/usr/lib/postgresql/*/bin`, highest major version first (Debian's layout).
//!
//! A directory counts only if it holds both `postgres` and `initdb`, and the version is read
//! from `postgres --version`, never guessed from the path.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PostgreSQL major version zenith is tested with (see `vendor/postgres/`).
pub const TESTED_MAJOR: u32 = 15;

/// A PostgreSQL installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgInstall {
    /// Directory holding `postgres`, `initdb`, `pg_ctl`, ...
    pub bin_dir: PathBuf,
    /// Full version, e.g. `15.18`.
    pub version: String,
    /// Major version, e.g. 15.
    pub major: u32,
    /// Where it was found (`ZENITH_PG_BIN`, `pg_config`, `PATH`, `/usr/lib/postgresql`).
    pub found_via: &'static str,
}

impl PgInstall {
    /// Path of one of the installation's programs.
    pub fn bin(&self, program: &str) -> PathBuf {
        self.bin_dir.join(program)
    }
}

/// No usable PostgreSQL; the message says how to get one.
#[derive(Debug, thiserror::Error)]
pub enum PgNotFound {
    #[error("ZENITH_PG_BIN={dir:?} does not hold PostgreSQL's postgres and initdb ({why}); point it at a bin directory such as /usr/lib/postgresql/{TESTED_MAJOR}/bin")]
    BadOverride { dir: String, why: String },
    #[error("PostgreSQL not found (looked at ZENITH_PG_BIN, pg_config, PATH and /usr/lib/postgresql/*/bin); install it with `apt-get install postgresql-{TESTED_MAJOR}` (or `bash vendor/postgres/install.sh`), or set ZENITH_PG_BIN to its bin directory")]
    Missing,
}

/// Where to look; [`SearchEnv::from_process`] reads the real environment.
#[derive(Debug, Clone, Default)]
pub struct SearchEnv {
    pub pg_bin: Option<OsString>,
    pub path: Option<OsString>,
    pub debian_root: PathBuf,
}

impl SearchEnv {
    pub fn from_process() -> Self {
        SearchEnv {
            pg_bin: std::env::var_os("ZENITH_PG_BIN").filter(|v| !v.is_empty()),
            path: std::env::var_os("PATH"),
            debian_root: PathBuf::from("/usr/lib/postgresql"),
        }
    }
}

/// Finds PostgreSQL using the process environment.
pub fn find_postgres() -> Result<PgInstall, PgNotFound> {
    find_postgres_with(&SearchEnv::from_process())
}

/// Finds PostgreSQL using `env`.
pub fn find_postgres_with(env: &SearchEnv) -> Result<PgInstall, PgNotFound> {
    if let Some(dir) = &env.pg_bin {
        return probe(Path::new(dir), "ZENITH_PG_BIN").map_err(|why| PgNotFound::BadOverride {
            dir: Path::new(dir).display().to_string(),
            why,
        });
    }
    let path_dirs: Vec<PathBuf> = env
        .path
        .as_ref()
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    if let Some(pg_config) = path_dirs
        .iter()
        .map(|d| d.join("pg_config"))
        .find(|p| p.is_file())
    {
        if let Ok(out) = Command::new(&pg_config).arg("--bindir").output() {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !dir.is_empty() {
                if let Ok(found) = probe(Path::new(&dir), "pg_config") {
                    return Ok(found);
                }
            }
        }
    }
    for dir in &path_dirs {
        let candidate = dir.join("postgres");
        if candidate.is_file() {
            let real = std::fs::canonicalize(&candidate).unwrap_or(candidate);
            if let Some(parent) = real.parent() {
                if let Ok(found) = probe(parent, "PATH") {
                    return Ok(found);
                }
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(&env.debian_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    versions
        .iter()
        .find_map(|(_, dir)| probe(dir, "/usr/lib/postgresql").ok())
        .ok_or(PgNotFound::Missing)
}

fn probe(dir: &Path, found_via: &'static str) -> Result<PgInstall, String> {
    for program in ["postgres", "initdb"] {
        if !dir.join(program).is_file() {
            return Err(format!("no {program} in it"));
        }
    }
    let out = Command::new(dir.join("postgres"))
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run postgres --version: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text)
        .ok_or_else(|| format!("unexpected `postgres --version` output {text:?}"))?;
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    Ok(PgInstall {
        bin_dir: dir.to_path_buf(),
        version,
        major,
        found_via,
    })
}

/// `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` → `15.18`.
fn parse_version(text: &str) -> Option<String> {
    let rest = text.trim().strip_prefix("postgres (PostgreSQL) ")?;
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!version.is_empty()).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_install(dir: &Path, version_line: &str) {
        std::fs::create_dir_all(dir).unwrap();
        let script = format!("#!/bin/sh\necho '{version_line}'\n");
        for program in ["postgres", "initdb"] {
            let p = dir.join(program);
            std::fs::write(&p, &script).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n").as_deref(),
            Some("15.18")
        );
        assert_eq!(
            parse_version("postgres (PostgreSQL) 17beta1").as_deref(),
            Some("17")
        );
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn debian_layout_prefers_the_highest_major() {
        let root = tempfile::tempdir().unwrap();
        fake_install(&root.path().join("14/bin"), "postgres (PostgreSQL) 14.9");
        fake_install(&root.path().join("15/bin"), "postgres (PostgreSQL) 15.18");
        std::fs::create_dir_all(root.path().join("16/bin")).unwrap(); // empty: skipped
        let env = SearchEnv {
            pg_bin: None,
            path: Some("".into()),
            debian_root: root.path().into(),
        };
        let found = find_postgres_with(&env).unwrap();
        assert_eq!(
            (found.major, found.version.as_str(), found.found_via),
            (15, "15.18", "/usr/lib/postgresql")
        );
    }

    #[test]
    fn override_wins_and_a_bad_override_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        fake_install(&root.path().join("custom"), "postgres (PostgreSQL) 15.2");
        let env = SearchEnv {
            pg_bin: Some(root.path().join("custom").into()),
            path: None,
            debian_root: root.path().join("none"),
        };
        assert_eq!(find_postgres_with(&env).unwrap().found_via, "ZENITH_PG_BIN");
        let env = SearchEnv {
            pg_bin: Some(root.path().join("nope").into()),
            ..env
        };
        let e = find_postgres_with(&env).unwrap_err().to_string();
        assert!(
            e.contains("ZENITH_PG_BIN") && e.contains("no postgres"),
            "{e}"
        );
    }

    #[test]
    fn nothing_found_says_how_to_install() {
        let env = SearchEnv {
            pg_bin: None,
            path: Some("".into()),
            debian_root: "/nonexistent".into(),
        };
        let e = find_postgres_with(&env).unwrap_err().to_string();
        assert!(e.contains("apt-get install postgresql-15"), "{e}");
    }
}
