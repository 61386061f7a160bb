//! `zenith storage ...`: named storages (not built yet) and `storage check`, the probe a
//! user runs before trusting a destination.

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;

use super::CliError;
use crate::storage::{self, check};
use crate::util::size::{format_size, parse_size};

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Give a storage URL a name, like a git remote
    Attach {
        #[arg(short, long)]
        name: String,
        #[arg(long, value_name = "URL")]
        path: String,
    },
    /// Forget a named storage (its content is left alone)
    Detach {
        #[arg(short, long)]
        name: String,
    },
    /// List named storages
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a named storage: snapshots there, space used
    Show {
        #[arg(short, long)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Probe a destination: write, read, list and delete under a temporary prefix,
    /// measure throughput, clean up; exit 1 if it is not usable
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The destination: file:///path, a plain path, or s3://bucket/prefix
    #[arg(value_name = "URL")]
    pub url: String,
    /// Size of the large object used for the multipart and throughput steps
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub size: u64,
    /// Upload this file as the large object (and download it back beside it) instead of
    /// generated data
    #[arg(long, value_name = "PATH", conflicts_with = "size")]
    pub file: Option<std::path::PathBuf>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cmd: StorageCommand) -> Result<(), CliError> {
    match cmd {
        StorageCommand::Check(args) => check_cmd(args).await,
        StorageCommand::Attach { .. } => Err(CliError::NotImplemented("storage attach".into())),
        StorageCommand::Detach { .. } => Err(CliError::NotImplemented("storage detach".into())),
        StorageCommand::List { .. } => Err(CliError::NotImplemented("storage list".into())),
        StorageCommand::Show { .. } => Err(CliError::NotImplemented("storage show".into())),
    }
}

async fn check_cmd(args: CheckArgs) -> Result<(), CliError> {
    let storage = storage::open(&args.url)
        .await
        .map_err(anyhow::Error::from)?;
    let json = args.json;
    if !json {
        match &args.file {
            Some(file) => println!("checking {} with {}", storage.url(), file.display()),
            None => println!(
                "checking {} with a {} object",
                storage.url(),
                format_size(args.size)
            ),
        }
    }
    let mut print = |step: &check::Step| {
        if !json {
            let status = if step.ok { "ok  " } else { "FAIL" };
            println!(
                "  {status}  {:<13} {:>7} ms  {}",
                step.name, step.millis, step.detail
            );
            let _ = std::io::stdout().flush();
        }
    };
    let report = check::run(
        storage.as_ref(),
        &check::CheckOptions {
            size: args.size,
            file: args.file,
        },
        &mut print,
    )
    .await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot format the report")?
        );
    } else {
        match (report.upload_mib_per_sec, report.download_mib_per_sec) {
            (Some(up), Some(down)) => {
                println!("throughput: upload {up:.1} MiB/s, download {down:.1} MiB/s")
            }
            (Some(up), None) => println!("throughput: upload {up:.1} MiB/s"),
            _ => {}
        }
        if report.ok() {
            println!("{} is usable", report.url);
        } else {
            let failed: Vec<&str> = report
                .steps
                .iter()
                .filter(|s| !s.ok)
                .map(|s| s.name.as_str())
                .collect();
            println!("{} is NOT usable: {} failed", report.url, failed.join(", "));
        }
    }
    if report.ok() {
        Ok(())
    } else {
        Err(CliError::Exit(1))
    }
}
