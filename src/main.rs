//! The `bgjobs` binary: parses the command line and hands over to the library.
#![forbid(unsafe_code)]

use clap::Parser;

// Why jemalloc: src/allocator.rs.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: bgjobs::allocator::Jemalloc = bgjobs::allocator::Jemalloc;

fn main() -> std::process::ExitCode {
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
