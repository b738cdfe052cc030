//! The `groupbuy` binary: layer the configuration, parse flags, set up logging, run the
//! subcommand.

use clap::Parser;
use gateway::cli::{self, Cli, Command, LogFormat, ProjectionsCommand};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    // The file goes under the environment before anything reads it, and before any thread
    // starts.
    let file = gateway::config::file_from(std::env::args_os().skip(1));
    let applied = match &file {
        Some(path) => gateway::config::apply(path)?,
        None => Vec::new(),
    };
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    if let Some(path) = &file {
        // Names only: values may be secrets.
        tracing::info!(file = %path.display(), settings = ?applied, "configuration file applied");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => cli::serve(*args).await?,
        Command::Migrate(args) => cli::migrate(args).await?,
        Command::Projections(ProjectionsCommand::Rebuild(args)) => cli::rebuild(args).await?,
        Command::Projections(ProjectionsCommand::List(args)) => cli::list_projections(args).await?,
        Command::Audit(args) => {
            if !cli::audit(args).await? {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
