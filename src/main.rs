//! The `bgjobs` binary: parses the command line and hands over to the library.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = bgjobs::cli::Cli::parse();
    match bgjobs::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bgjobs: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
