//! `bgjobs-node-agent`: the process-based kubelet stand-in (see the library's docs). Dev tooling only.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use bgjobs::cli::init_tracing;
use bgjobs::config::LogFormat;
use bgjobs_node_agent::{NodeAgentConfig, run};
use clap::Parser;

/// TEST/DEV TOOLING, NOT FOR PRODUCTION: a local stand-in for a kubelet that runs Pods as local processes.
///
/// Registers a Node (and keeps its Lease and Ready condition fresh), runs the first container's command + args of
/// every Pod the scheduler binds to it as a local child process (no image, no isolation: it runs on this host as this
/// user), reports Pending → Running → Succeeded/Failed with exit codes, and kills the process group when the Pod is
/// deleted. restartPolicy is treated as Never. For real containers use the node of `e2e/cluster.sh up --node`.
#[derive(Parser)]
#[command(name = "bgjobs-node-agent")]
struct Cli {
    #[command(flatten)]
    config: NodeAgentConfig,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(LogFormat::Text);
    match run(cli.config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bgjobs-node-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
