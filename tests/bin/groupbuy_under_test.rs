//! `groupbuy serve` as a process of the tests' own, so that a test can kill it the way a crash
//! does (`SIGKILL`, nothing flushed) and start it again. It runs the same code as the
//! `groupbuy` binary's `serve` (`gateway::cli::serve`), configured by the same flags and
//! environment variables.

use clap::Parser;
use gateway::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let Command::Serve(args) = cli.command else {
        anyhow::bail!("this binary only serves");
    };
    let telemetry = gateway::telemetry::init(cli.log_format, None)?;
    let served = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(gateway::cli::serve(*args));
    telemetry.shutdown();
    Ok(served?)
}
