//! The `groupbuy` binary: parse flags, set up logging, run the subcommand.

use clap::Parser;
use gateway::cli::{self, Cli, Command, ProjectionsCommand};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match cli.command {
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
