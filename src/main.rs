//! The `opsd` command line: `opsd serve` (flags → `Config` →
//! `server::run`) and `opsd ops` (a client of a running server).

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: faster than the system allocator for opsd's many small
/// allocations, with no per-allocation header, so a stored operation and a
/// parked Wait cost less memory (benches/README.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// opsd serves the google.longrunning.Operations API (List, Get, Delete,
/// Cancel, Wait) and the opsd.v1.Workers API through which services register
/// their long-running jobs, report progress and results, and learn of
/// cancellations.
#[derive(Parser, Debug)]
#[command(name = "opsd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve gRPC (Operations, Workers, Console, health, reflection) and the
    /// REST/JSON surface on one port.
    Serve(Box<cli::serve::ServeArgs>),
    /// Call a running server: list, get, cancel, delete, wait for and watch
    /// operations (gRPC). A failed call exits with 64 + its gRPC code.
    Ops(cli::ops::OpsArgs),
    /// Create or migrate the schema of a PostgreSQL store, and nothing else
    /// (`opsd serve` also migrates at start-up; both take an advisory lock).
    Migrate(cli::migrate::MigrateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server uses every core it is given.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(async {
            match cli.command {
                Command::Serve(args) => cli::serve::run(*args).await,
                Command::Ops(args) => cli::ops::run(args).await,
                Command::Migrate(args) => cli::migrate::run(args).await,
            }
        }),
        Err(err) => {
            eprintln!("opsd: cannot start the Tokio runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
