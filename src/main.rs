//! The `sandwarden` binary: parse the command line and hand over to the library.

use clap::Parser;

/// serve's allocator (docs/benchmarks.md: more turns per CPU-second and a shorter message path
/// than glibc's). `sandwarden-harness`, the program every sandbox runs, keeps the system one.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = sandwarden::cli::Cli::parse();
    match sandwarden::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandwarden: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
