//! The `sandwarden` binary: parse the command line and hand over to the library.

use clap::Parser;

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
