//! The `groupbuy` binary: layer the configuration, parse flags, set up logging, run the
//! subcommand.

use clap::Parser;
use gateway::cli::{self, Cli, Command, ProjectionsCommand};

// The service allocates many small, short-lived values on every thread (JSON, events, spans);
// glibc's allocator spent about a third of the CPU on them under a flash sale.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match groupbuy() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        // An audit's violations or a failed check, already reported.
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", cli::error_chain(&chain));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the command line; false when it found something wrong.
fn groupbuy() -> anyhow::Result<bool> {
    // The file goes under the environment before anything reads it, and before any thread
    // starts.
    let file = gateway::config::file_from(std::env::args_os().skip(1));
    let applied = match &file {
        Some(path) => gateway::config::apply(path)?,
        None => Vec::new(),
    };
    let cli = Cli::parse();
    // Before the runtime: the OTLP exporter's client blocks on a thread of its own.
    let telemetry = gateway::telemetry::init(cli.log_format, cli.otlp().as_ref())?;
    if let Some(path) = &file {
        // Names only: values may be secrets.
        tracing::info!(file = %path.display(), settings = ?applied, "configuration file applied");
    }
    let clean = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cli.command));
    telemetry.shutdown();
    clean
}

/// Runs the subcommand; false when it found something wrong (an audit's violations, a load
/// generator's failed check).
async fn run(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Serve(args) => cli::serve(*args).await?,
        Command::Migrate(args) => cli::migrate(args).await?,
        Command::Projections(ProjectionsCommand::Rebuild(args)) => cli::rebuild(args).await?,
        Command::Projections(ProjectionsCommand::List(args)) => cli::list_projections(args).await?,
        Command::Audit(args) => return Ok(cli::audit(args).await?),
        Command::Events(args) => cli::events(args).await?,
        Command::DeadLetters(args) => {
            print!("{}", gateway::dead_letters_cli::command(args).await?);
        }
        Command::Loadgen(args) => return gateway::loadgen::command(args).await,
        Command::Completions { shell } => {
            use std::io::Write;
            match std::io::stdout().write_all(&cli::completions(shell)) {
                // A reader that stopped early (`| head`) is not an error.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
        }
    }
    Ok(true)
}
