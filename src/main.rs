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
            // A terminal program's exit status (`attach`), or a chat whose turns failed.
            if let Some(status) = e.downcast_ref::<sandwarden::client::ExitStatus>() {
                return std::process::ExitCode::from(status.code);
            }
            // `launch` that could not run its program exits as a shell would (127: not found).
            e.downcast_ref::<sandwarden_harness::launch::LaunchError>()
                .and_then(sandwarden_harness::launch::LaunchError::exit_code)
                .map_or(
                    std::process::ExitCode::FAILURE,
                    std::process::ExitCode::from,
                )
        }
    }
}
