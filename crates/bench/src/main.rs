//! `sandwarden-bench`: sandwarden's benchmarks (docs/benchmarks.md).

use clap::Parser;

/// Measure the harness server or the orchestrator, side by side with their baselines.
#[derive(Parser)]
#[command(name = "sandwarden-bench", version)]
struct Cli {
    #[command(flatten)]
    args: sandwarden_bench::bench::BenchArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let run = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(sandwarden_bench::bench::run(cli.args)));
    match run {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandwarden-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
