//! `sandwarden-fake-model`: the fake model server on loopback (docs/fake-model.md).

use clap::Parser;
use sandwarden_testkit::fake_model::{FakeModelArgs, run};

/// A scriptable fake model server (Anthropic, OpenAI Chat and Responses APIs) on loopback, for
/// driving real agent CLIs without a model key.
#[derive(Parser)]
#[command(name = "sandwarden-fake-model", version)]
struct Cli {
    #[command(flatten)]
    args: FakeModelArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sandwarden_proto::logs::init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandwarden-fake-model: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("sandwarden-fake-model: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
