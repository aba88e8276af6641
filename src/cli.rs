//! The `bgjobs` command line.

use clap::{Parser, Subcommand};

/// bgjobs: a durable, parallel background-job queue made of Kubernetes objects.
#[derive(Parser, Debug)]
#[command(name = "bgjobs", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the CustomResourceDefinitions as YAML (`bgjobs crd | kubectl apply -f -`).
    Crd,
}

/// Run the parsed command line.
pub async fn run(cli: Cli) -> crate::Result<()> {
    match cli.command {
        Command::Crd => {
            print!("{}", crate::api::crd_yaml());
            Ok(())
        }
    }
}
