//! The `bgjobs` binary: parses the command line and hands over to the library.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before the runtime's threads exist: each keeps the allocator arena it first gets.
    bgjobs::operator::keep_little_freed_memory();
    let cli = bgjobs::cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let result = runtime.map_err(bgjobs::Error::from).and_then(|r| r.block_on(bgjobs::cli::run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bgjobs: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
