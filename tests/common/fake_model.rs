//! A real `sandwarden-fake-model` process on 127.0.0.1:0, for tests that drive model clients.

use std::process::{Child, Command};

pub struct FakeModel {
    child: Child,
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub base: String,
}

impl FakeModel {
    /// Starts the fake with `extra` flags and waits for its listen line.
    pub fn start(extra: &[&str]) -> FakeModel {
        let (child, addr) = super::spawn_listening(
            Command::new(super::fake_model_exe())
                .args(["--listen", "127.0.0.1:0"])
                .args(extra)
                .env("SANDWARDEN_LOG", "warn"),
            "sandwarden-fake-model",
        );
        let base = format!("http://{addr}");
        FakeModel { child, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The requests the fake has recorded, oldest first.
    pub async fn requests(&self) -> Vec<serde_json::Value> {
        reqwest::get(self.url("/_fake/requests"))
            .await
            .expect("GET /_fake/requests")
            .json()
            .await
            .expect("requests are JSON")
    }
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        super::terminate(&mut self.child);
    }
}
