//! The two things every part says about a harness: its kind (an ACP agent behind the API, or a
//! program under a terminal) and when it starts its agent. Templates, the CRDs, the harness
//! server's flags and sessions all use these, in lowercase (`api`, `tui`; `boot`, `bind`).

use serde::{Deserialize, Serialize};

/// Harness kinds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum HarnessKind {
    #[cfg_attr(
        feature = "clap",
        value(help = "an ACP agent over stdio, reached through the API")
    )]
    Api,
    #[cfg_attr(
        feature = "clap",
        value(help = "a program under a PTY, reached over a WebSocket")
    )]
    Tui,
}

/// When the agent starts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum StartMode {
    #[default]
    #[cfg_attr(
        feature = "clap",
        value(help = "start the agent as soon as the server starts (fastest first turn)")
    )]
    Boot,
    #[cfg_attr(
        feature = "clap",
        value(help = "wait for `POST /v1/bind` (per-session env and files reach a warm sandbox)")
    )]
    Bind,
}

impl HarnessKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HarnessKind::Api => "api",
            HarnessKind::Tui => "tui",
        }
    }
}

impl StartMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StartMode::Boot => "boot",
            StartMode::Bind => "bind",
        }
    }
}

impl std::fmt::Display for HarnessKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for StartMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_start_modes_read_and_print_in_lowercase() {
        for kind in [HarnessKind::Api, HarnessKind::Tui] {
            let json = serde_json::to_string(&kind).expect("json");
            assert_eq!(json, format!("\"{kind}\""));
            assert_eq!(serde_json::from_str::<HarnessKind>(&json).ok(), Some(kind));
        }
        for start in [StartMode::Boot, StartMode::Bind] {
            let json = serde_json::to_string(&start).expect("json");
            assert_eq!(json, format!("\"{start}\""));
            assert_eq!(serde_json::from_str::<StartMode>(&json).ok(), Some(start));
        }
        assert!(serde_json::from_str::<HarnessKind>("\"gui\"").is_err());
    }
}
