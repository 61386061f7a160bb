//! The command line: clap definitions of the brief's whole command surface, and the glue
//! from a parsed command to the library. Only this module knows about clap and terminals.
//!
//! Commands that are not built yet are listed (so `--help` shows the whole contract) and
//! answer "not implemented yet" with exit code 2 instead of pretending to work.

mod client;
mod inspect;
mod local;
mod pg;
mod progress;
mod snapshot;
mod storage;
mod wal;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub use snapshot::SnapshotCommand;

/// Exit code for a command that is part of the contract but not built yet.
pub const EXIT_NOT_IMPLEMENTED: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "zenith",
    version,
    about = "Run PostgreSQL locally with snapshots at its heart",
    long_about = "Run PostgreSQL locally with snapshots at its heart: snapshot, roll back, branch, export, \
                  push and pull databases.\n\nStorage destinations are URLs (file:///path, a plain path, \
                  s3://bucket/prefix); S3 credentials and settings come from the environment \
                  (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, ...), \
                  see docs/storages.md.",
    propagate_version = true
)]
pub struct Cli {
    /// The repo directory [default: $ZENITH_REPO_DIR, else ~/.zenith; /var/lib/zenith as root]
    #[arg(
        long,
        alias = "repo_dir",
        global = true,
        env = "ZENITH_REPO_DIR",
        value_name = "DIR"
    )]
    pub repo_dir: Option<PathBuf>,

    /// Do not draw progress bars
    #[arg(long, alias = "no_progress", global = true)]
    pub no_progress: bool,

    /// More log output on stderr (-v: info, -vv: debug); ZENITH_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the local repo (initdb, or import an existing snapshot or PGDATA)
    Init(InitArgs),
    /// Run zenith-local and the main pg
    Start {
        /// Stay attached instead of running in the background
        #[arg(long)]
        foreground: bool,
    },
    /// Stop zenith-local and every pg it started
    Stop {
        /// Do not wait for clients to disconnect
        #[arg(long)]
        immediate: bool,
    },
    /// Print a link that opens zenith console, the web UI, logged in (once, within two
    /// minutes); zenith-local must run
    Console,
    /// Show components, ports, pgs and the newest snapshot
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Add a snapshot from a PGDATA, a basebackup, a zenith storage or a running server
    Import(snapshot::ImportArgs),
    /// Write a snapshot somewhere else, in any format
    Export(snapshot::ExportArgs),
    /// Push snapshots of the repo to a storage; only missing content moves, and a push cut
    /// short resumes where it stopped
    Push {
        /// Snapshot to push [default: every snapshot not yet there; for storage_dest, every
        /// one of the main pg's cluster]
        snapshot: Option<String>,
        /// Named storage or URL [default: storage_dest]; given alone, a storage name or URL
        /// is the storage
        storage: Option<String>,
        /// Push from this storage (name or URL) instead of the repo: S3 to S3, file to S3
        #[arg(long, value_name = "STORAGE|URL")]
        from: Option<String>,
    },
    /// Pull a snapshot from a storage into the repo (no pg changes; `pg create --snapshot`
    /// uses it)
    Pull {
        /// Named storage or URL
        source: String,
        /// Snapshot to pull [default: LATEST]
        snapshot: Option<String>,
    },
    /// Manage snapshots
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Manage compute nodes (PostgreSQL servers)
    #[command(subcommand)]
    Pg(PgCommand),
    /// Manage and probe storage destinations
    #[command(subcommand)]
    Storage(storage::StorageCommand),
    /// archive_command for any PostgreSQL: archive one WAL file (0 once it is durable)
    #[command(name = "wal-push")]
    WalPush {
        /// Path of the WAL file (%p)
        path: PathBuf,
        #[command(flatten)]
        archive: wal::ArchiveArgs,
        /// WAL files in flight at once: the file asked for and the next ready segments
        #[arg(long, env = "ZENITH_WAL_PUSH_CONCURRENCY", default_value_t = 4)]
        concurrency: usize,
    },
    /// restore_command for any PostgreSQL: restore one WAL file (exit 1: not in the
    /// archive; 255: any other failure, which stops recovery)
    #[command(name = "wal-fetch")]
    WalFetch {
        /// WAL file name (%f)
        name: String,
        /// Where to write it (%p)
        destination: PathBuf,
        #[command(flatten)]
        archive: wal::ArchiveArgs,
        /// Segments fetched ahead in the background (0: none)
        #[arg(long, env = "ZENITH_WAL_PREFETCH", default_value_t = 8)]
        prefetch: u64,
        /// Only fetch the segments after NAME into the prefetch directory (what wal-fetch
        /// starts in the background)
        #[arg(long, hide = true)]
        prefetch_only: bool,
    },
    /// The WAL archive
    #[command(subcommand)]
    Wal(wal::WalCommand),
    /// The safekeeper of a zenith pg (zenith-local runs it): streams the pg's WAL to its
    /// storage_dest and reports it flushed once stored
    #[command(hide = true)]
    Safekeeper {
        #[command(flatten)]
        archive: wal::ArchiveArgs,
        /// The pg's Unix socket (`DIR/.s.PGSQL.PORT`)
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Where it reports what it does (JSON)
        #[arg(long, value_name = "FILE")]
        report: PathBuf,
        /// Store what arrived at most this often (0: each batch at once, for sync mode)
        #[arg(long, value_name = "MS", default_value_t = 0)]
        batch_ms: u64,
    },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where snapshots and WAL are pushed (saved in config.toml; credentials never are)
    #[arg(long, alias = "storage_dest", value_name = "URL")]
    pub storage_dest: Option<String>,
    /// Start from this snapshot or PGDATA (used once, not saved)
    #[arg(long, alias = "snapshot_path", value_name = "URL")]
    pub snapshot_path: Option<String>,
    /// Format at snapshot_path: pgdata, basebackup or zenith
    #[arg(long, alias = "snapshot_format", value_name = "FORMAT")]
    pub snapshot_format: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PgCommand {
    /// Create a pg: empty, from a snapshot, or as another pg was at a point in time
    Create {
        name: String,
        #[arg(long, conflicts_with = "at")]
        snapshot: Option<String>,
        /// A time (2026-12-03 10:00:00+00; no zone: UTC) or WAL position (0/3000060) of
        /// pg --from: the newest snapshot before it plus the WAL archived in storage_dest
        #[arg(long, value_name = "TIME|LSN")]
        at: Option<String>,
        /// The pg whose history --at is in [default: main]
        #[arg(long, value_name = "PG", requires = "at")]
        from: Option<String>,
        #[arg(long)]
        no_start: bool,
    },
    /// Start a pg (with --replica: as a streaming replica of a primary)
    ///
    /// A replica's data becomes a fresh copy of its primary's; what the pg held is kept
    /// first as snapshot NAME@HEAD{number} if it ever ran as a primary.
    Start {
        name: String,
        /// Follow a primary by streaming replication (read-only until `pg promote`)
        #[arg(long)]
        replica: bool,
        /// The pg a replica follows [default: main]
        #[arg(long, value_name = "PG", requires = "replica")]
        primary: Option<String>,
    },
    /// Stop a pg
    Stop {
        name: String,
        /// Do not wait for clients to disconnect
        #[arg(long)]
        immediate: bool,
    },
    /// Promote a running replica to a primary of its own
    Promote { name: String },
    /// Stop and delete a pg
    Destroy { name: String },
    /// List pgs
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one pg
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Roll a pg back to a snapshot or a point in time, keeping its current state as
    /// NAME@HEAD{number}
    Checkout {
        name: String,
        #[arg(required_unless_present = "at", conflicts_with = "at")]
        snapshot: Option<String>,
        /// A time (2026-12-03 10:00:00+00; no zone: UTC) or WAL position of the pg's own
        /// history: the newest snapshot before it plus the WAL archived in storage_dest
        #[arg(long, value_name = "TIME|LSN")]
        at: Option<String>,
    },
}

/// What a command's failure looks like to `main`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("`zenith {0}` is not implemented yet")]
    NotImplemented(String),
    /// The command ran and reported its own outcome; exit with this code, print nothing more.
    #[error("exit {0}")]
    Exit(u8),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<crate::models::OpError> for CliError {
    fn from(e: crate::models::OpError) -> Self {
        CliError::Other(anyhow::Error::new(e))
    }
}

impl From<crate::snapshot::SnapshotError> for CliError {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        CliError::Other(anyhow::Error::new(e))
    }
}

impl From<crate::compute::Error> for CliError {
    fn from(e: crate::compute::Error) -> Self {
        CliError::Other(anyhow::Error::new(e))
    }
}

impl From<crate::storage::Error> for CliError {
    fn from(e: crate::storage::Error) -> Self {
        CliError::Other(anyhow::Error::new(e))
    }
}

/// Parses the process arguments, runs the command and returns the exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // As a restore_command, any failure but "not in the archive" must stop
            // recovery: PostgreSQL reads exit codes up to 125 as "not found".
            let fetch = std::env::args().skip(1).any(|a| a == "wal-fetch");
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ if fetch => wal::EXIT_FATAL,
                _ => e.exit_code() as u8,
            };
            return ExitCode::from(code);
        }
    };
    init_logging(cli.verbose);
    quiet_on_closed_stdout();
    if matches!(cli.command, Command::WalFetch { .. }) {
        // PostgreSQL reads exit codes up to 125 as "not in the archive": a bug must stop
        // recovery, not end it early.
        std::panic::set_hook(Box::new(|info| {
            eprintln!("zenith: error: wal-fetch failed unexpectedly: {info}");
            std::process::exit(i32::from(wal::EXIT_FATAL));
        }));
    }
    // The safekeeper is one task on a socket and a file: one thread spares it the
    // wake-ups across threads that every sync commit would wait for.
    let mut builder = if matches!(cli.command, Command::Safekeeper { .. }) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zenith: error: cannot start the async runtime: {e}");
            return match cli.command {
                Command::WalFetch { .. } => ExitCode::from(wal::EXIT_FATAL),
                _ => ExitCode::FAILURE,
            };
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Exit(code)) => ExitCode::from(code),
        Err(e @ CliError::NotImplemented(_)) => {
            eprintln!("zenith: {e}");
            ExitCode::from(EXIT_NOT_IMPLEMENTED)
        }
        Err(CliError::Other(e)) => {
            eprintln!(
                "zenith: error: {}",
                one_line(&crate::util::message::full(e.as_ref()))
            );
            ExitCode::FAILURE
        }
    }
}

/// `zenith … | head`: once the reader of stdout goes away, `println!` panics with "failed
/// printing to stdout". Like any Unix tool, zenith then stops quietly, with the status a
/// SIGPIPE gives (141); every other panic is reported as before.
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout")
            && message.contains(&format!("(os error {})", libc::EPIPE))
        {
            std::process::exit(141);
        }
        report(info);
    }));
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Storage(cmd) => storage::run(cmd, cli.repo_dir).await,
        Command::Push {
            snapshot,
            storage,
            from,
        } => storage::push(snapshot, storage, from, cli.repo_dir, !cli.no_progress).await,
        Command::Pull { source, snapshot } => {
            storage::pull(source, snapshot, cli.repo_dir, !cli.no_progress).await
        }
        Command::Export(args) => snapshot::export(args, cli.repo_dir, !cli.no_progress).await,
        Command::Import(args) => snapshot::import(args, cli.repo_dir, !cli.no_progress).await,
        Command::Snapshot(snapshot::SnapshotCommand::Create { name }) => {
            pg::snapshot_create(name, cli.repo_dir, !cli.no_progress).await
        }
        Command::Snapshot(cmd) => snapshot::run(cmd, cli.repo_dir, !cli.no_progress).await,
        Command::Pg(cmd) => pg::run(cmd, cli.repo_dir, !cli.no_progress).await,
        Command::Init(args) => local::init(args, cli.repo_dir).await,
        Command::Start { foreground } => local::start(foreground, cli.repo_dir).await,
        Command::Stop { immediate } => local::stop(immediate, cli.repo_dir).await,
        Command::Status { json } => local::status(json, cli.repo_dir).await,
        Command::Console => local::console(cli.repo_dir).await,
        Command::WalPush {
            path,
            archive,
            concurrency,
        } => wal::wal_push(path, archive, concurrency, cli.repo_dir).await,
        Command::WalFetch {
            name,
            destination,
            archive,
            prefetch,
            prefetch_only,
        } => {
            wal::wal_fetch(
                name,
                destination,
                archive,
                prefetch,
                prefetch_only,
                cli.repo_dir,
            )
            .await
        }
        Command::Wal(cmd) => wal::run(cmd, cli.repo_dir).await,
        Command::Safekeeper {
            archive,
            socket,
            report,
            batch_ms,
        } => wal::safekeeper(archive, socket, report, batch_ms, cli.repo_dir).await,
    }
}

/// A report as pretty JSON (`--json`).
fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("reports serialize")
    );
}

/// A report's fields as aligned `key value` lines, sorted by key;
/// text from storages printed safely.
fn print_fields(value: &impl serde::Serialize) {
    let value = serde_json::to_value(value).expect("reports serialize");
    for (k, v) in value.as_object().into_iter().flatten() {
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{k:<18} {}", crate::util::message::printable(&text));
    }
}

/// A unit enum as the word the API uses for it (`running`, `replica`).
fn json_word(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value).expect("serializes") {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        // Other crates stay quiet by default: a failing command prints exactly one line.
        0 => "zenith=warn",
        1 => "zenith=info,warn",
        _ => "zenith=debug,info",
    };
    let filter = EnvFilter::try_from_env("ZENITH_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours only for a person: zenith-local's stderr is its log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Errors are one line: newlines from nested sources are folded.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
