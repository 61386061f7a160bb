//! zenith finds the stock PostgreSQL the test machine has (installed by
//! `vendor/postgres/install.sh`), and it is the pinned major version.

use zenith::compute::{find_postgres, PgInstall};

use crate::support::require;

#[test]
fn finds_the_pinned_postgresql() {
    let Some(pg) = require("PostgreSQL", find_postgres().ok()) else {
        return;
    };
    let PgInstall { bin_dir, major, .. } = &pg;
    let pinned: u32 =
        std::fs::read_to_string(crate::support::repo_root().join("vendor/postgres/VERSION"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert_eq!(*major, pinned, "found {pg:?}");
    for program in ["postgres", "initdb", "pg_ctl"] {
        assert!(
            bin_dir.join(program).is_file(),
            "{program} missing in {bin_dir:?}"
        );
    }
}
