//! The command line: clap definitions of the brief's whole command surface, and the glue
//! from a parsed command to the library. Only this module knows about clap and terminals.
//!
//! Commands that are not built yet are listed (so `--help` shows the whole contract) and
//! answer "not implemented yet" with exit code 2 instead of pretending to work.

mod client;
mod local;
mod pg;
mod progress;
mod snapshot;
mod storage;

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
    /// archive_command for any PostgreSQL: store one WAL segment
    #[command(name = "wal-push")]
    WalPush {
        /// Path of the WAL file (%p)
        path: PathBuf,
    },
    /// restore_command for any PostgreSQL: fetch one WAL segment
    #[command(name = "wal-fetch")]
    WalFetch {
        /// WAL file name (%f)
        name: String,
        /// Where to write it (%p)
        destination: PathBuf,
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
    /// Create a pg, empty or from a snapshot
    Create {
        name: String,
        #[arg(long)]
        snapshot: Option<String>,
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
    /// Roll a pg back to a snapshot, keeping its current state as NAME@HEAD{number}
    Checkout { name: String, snapshot: String },
}

impl Command {
    /// The command's words, for messages ("pg create").
    fn words(&self) -> String {
        let sub = |s: &dyn std::fmt::Debug| {
            let text = format!("{s:?}");
            let name: String = text.chars().take_while(|c| c.is_alphanumeric()).collect();
            name.to_lowercase()
        };
        match self {
            Command::Init(_) => "init".into(),
            Command::Start { .. } => "start".into(),
            Command::Stop { .. } => "stop".into(),
            Command::Status { .. } => "status".into(),
            Command::Import(_) => "import".into(),
            Command::Export(_) => "export".into(),
            Command::Push { .. } => "push".into(),
            Command::Pull { .. } => "pull".into(),
            Command::Snapshot(c) => format!("snapshot {}", sub(c)),
            Command::Pg(c) => format!("pg {}", sub(c)),
            Command::Storage(c) => format!("storage {}", sub(c)),
            Command::WalPush { .. } => "wal-push".into(),
            Command::WalFetch { .. } => "wal-fetch".into(),
        }
    }
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
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zenith: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
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
        other => Err(CliError::NotImplemented(other.words())),
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
