//! The `zenith` binary: parse the command line, run it, map the outcome to an exit code.
//! Everything else lives in the library so tests can call it.

use std::process::ExitCode;

fn main() -> ExitCode {
    zenith::cli::main()
}
