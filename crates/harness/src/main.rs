//! `sandwarden-harness`: the harness server alone, `sandwarden harness` without the rest of
//! sandwarden linked in (this crate depends on the vocabulary only). It maps a quarter of the code and relocates a quarter of the data, so an
//! idle sandbox holds about half the memory; `serve` starts it when it sits next to `sandwarden`
//! and comes from the same build (`sandwarden_harness::binary`).

use clap::Parser;

#[derive(Parser)]
#[command(name = "sandwarden-harness", version = sandwarden_harness::binary::BUILD_ID)]
#[command(
    about = "The server inside a sandbox: drives one agent over ACP (api) or one program under a PTY (tui)"
)]
struct Cli {
    #[command(flatten)]
    args: sandwarden_harness::args::HarnessArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match sandwarden_harness::args::run_harness(cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandwarden-harness: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
