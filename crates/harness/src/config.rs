//! Maps a turn's options (`model`, `thinking`, `agent`) onto the session configuration an ACP
//! agent advertises (config options by category, or the older session modes). Pure: it decides
//! which changes to request and never talks to the agent.

use crate::event::{AgentOption, AgentOptions, OptionValue, TurnOptions};
use agent_client_protocol::v1::schema::{
    SessionConfigKind, SessionConfigOption, SessionConfigOptionCategory, SessionConfigOptionValue,
    SessionConfigSelectOption, SessionConfigSelectOptions, SessionModeState,
};

/// What the agent lets a client choose, as last reported by the agent.
#[derive(Debug, Clone, Default)]
pub struct Choices {
    pub options: Vec<SessionConfigOption>,
    pub modes: Option<SessionModeState>,
}

/// One change to ask the agent for before the prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// `session/set_config_option`.
    Option {
        id: String,
        value: SessionConfigOptionValue,
    },
    /// `session/set_mode`, for agents that offer modes but no mode config option.
    Mode(String),
}

/// Values that mean "no extended thinking" in a thought-level selector.
const THINKING_OFF: &[&str] = &["off", "none", "disabled", "no"];

fn select_values(options: &SessionConfigSelectOptions) -> Vec<&SessionConfigSelectOption> {
    match options {
        SessionConfigSelectOptions::Ungrouped(o) => o.iter().collect(),
        SessionConfigSelectOptions::Grouped(groups) => {
            groups.iter().flat_map(|g| g.options.iter()).collect()
        }
        _ => Vec::new(),
    }
}

fn by_category<'a>(
    choices: &'a Choices,
    category: &SessionConfigOptionCategory,
) -> Option<&'a SessionConfigOption> {
    choices
        .options
        .iter()
        .find(|o| o.category.as_ref() == Some(category))
}

/// Finds the offered value whose id or (case-insensitively) name is `wanted`.
fn pick<'a>(
    offered: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    wanted: &str,
) -> Option<&'a str> {
    let mut all = offered.clone().into_iter();
    all.find(|(id, _)| *id == wanted)
        .or_else(|| {
            offered
                .into_iter()
                .find(|(_, name)| name.eq_ignore_ascii_case(wanted))
        })
        .map(|(id, _)| id)
}

fn not_offered(field: &str, wanted: &str, offered: &[(&str, &str)]) -> String {
    let list: Vec<&str> = offered.iter().map(|(id, _)| *id).collect();
    format!(
        "{field} {wanted:?} is not offered by this agent; choose one of: {}",
        list.join(", ")
    )
}

/// A select option's change to `wanted` (by id or name), or none when it is already current.
fn select_change(
    field: &str,
    option: &SessionConfigOption,
    wanted: &str,
) -> Result<Option<Change>, String> {
    let SessionConfigKind::Select(select) = &option.kind else {
        return Err(format!(
            "this agent's {field} setting is not a list of choices; leave `{field}` out"
        ));
    };
    let values = select_values(&select.options);
    let offered: Vec<(&str, &str)> = values
        .iter()
        .map(|v| (&*v.value.0, v.name.as_str()))
        .collect();
    let id = pick(offered.iter().copied(), wanted)
        .ok_or_else(|| not_offered(field, wanted, &offered))?;
    if *select.current_value.0 == *id {
        return Ok(None);
    }
    Ok(Some(Change::Option {
        id: option.id.0.to_string(),
        value: SessionConfigOptionValue::from(id),
    }))
}

fn thinking_change(option: &SessionConfigOption, on: bool) -> Option<Change> {
    let off_like = |id: &str, name: &str| {
        THINKING_OFF
            .iter()
            .any(|o| id.eq_ignore_ascii_case(o) || name.eq_ignore_ascii_case(o))
    };
    let value = match &option.kind {
        SessionConfigKind::Boolean(b) if b.current_value != on => {
            SessionConfigOptionValue::from(on)
        }
        SessionConfigKind::Select(select) => {
            let values = select_values(&select.options);
            let current = values.iter().find(|v| v.value == select.current_value);
            let current_off = current.is_some_and(|v| off_like(&v.value.0, &v.name));
            if current.is_some() && current_off != on {
                return None;
            }
            // On: the first level that is not off; off: the first level that is off.
            let target = values
                .iter()
                .find(|v| off_like(&v.value.0, &v.name) != on)?;
            SessionConfigOptionValue::from(&*target.value.0)
        }
        _ => return None,
    };
    Some(Change::Option {
        id: option.id.0.to_string(),
        value,
    })
}

/// What the agent offers, by the message field that chooses it: its model and mode options (or
/// its session modes) and its thought level when that is a list.
pub fn offered(choices: &Choices) -> AgentOptions {
    let listed = |field: &str, option: &SessionConfigOption| {
        let SessionConfigKind::Select(select) = &option.kind else {
            return None;
        };
        Some(AgentOption {
            id: field.to_string(),
            name: option.name.clone(),
            current: Some(select.current_value.0.to_string()),
            values: select_values(&select.options)
                .into_iter()
                .map(|v| OptionValue {
                    id: v.value.0.to_string(),
                    name: v.name.clone(),
                })
                .collect(),
        })
    };
    let mut options = Vec::new();
    if let Some(o) = by_category(choices, &SessionConfigOptionCategory::Model) {
        options.extend(listed("model", o));
    }
    if let Some(o) = by_category(choices, &SessionConfigOptionCategory::Mode) {
        options.extend(listed("agent", o));
    } else if let Some(modes) = &choices.modes {
        options.push(AgentOption {
            id: "agent".into(),
            name: "Mode".into(),
            current: Some(modes.current_mode_id.0.to_string()),
            values: modes
                .available_modes
                .iter()
                .map(|m| OptionValue {
                    id: m.id.0.to_string(),
                    name: m.name.clone(),
                })
                .collect(),
        });
    }
    if let Some(o) = by_category(choices, &SessionConfigOptionCategory::ThoughtLevel) {
        options.extend(listed("thinking", o));
    }
    AgentOptions { options }
}

/// Decides the changes that put the agent in the state `wanted` asks for. `model` and `agent`
/// must name something the agent offers; `thinking` is a hint an agent without a thought-level
/// setting ignores (its reasoning is surfaced either way).
pub fn plan(choices: &Choices, wanted: &TurnOptions) -> Result<Vec<Change>, String> {
    let mut changes = Vec::new();
    if let Some(model) = &wanted.model {
        let option = by_category(choices, &SessionConfigOptionCategory::Model).ok_or(
            "this agent does not let clients choose a model; leave `model` out, or set the model \
             in the harness template's environment",
        )?;
        changes.extend(select_change("model", option, model)?);
    }
    if let Some(agent) = &wanted.agent {
        if let Some(option) = by_category(choices, &SessionConfigOptionCategory::Mode) {
            changes.extend(select_change("agent", option, agent)?);
        } else if let Some(modes) = &choices.modes {
            let offered: Vec<(&str, &str)> = modes
                .available_modes
                .iter()
                .map(|m| (&*m.id.0, m.name.as_str()))
                .collect();
            let id = pick(offered.iter().copied(), agent)
                .ok_or_else(|| not_offered("agent", agent, &offered))?;
            if *modes.current_mode_id.0 != *id {
                changes.push(Change::Mode(id.to_string()));
            }
        } else {
            return Err(
                "this agent offers no modes to choose between; leave `agent` out".to_string(),
            );
        }
    }
    if let Some(on) = wanted.thinking
        && let Some(option) = by_category(choices, &SessionConfigOptionCategory::ThoughtLevel)
    {
        changes.extend(thinking_change(option, on));
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_client_protocol::v1::schema::{
        SessionConfigBoolean, SessionConfigSelect, SessionMode,
    };

    fn select(
        id: &'static str,
        category: SessionConfigOptionCategory,
        current: &'static str,
    ) -> SessionConfigOption {
        let values = match category {
            SessionConfigOptionCategory::Model => {
                vec![("small", "Small model"), ("large", "Large model")]
            }
            SessionConfigOptionCategory::ThoughtLevel => {
                vec![("off", "Off"), ("low", "Low"), ("high", "High")]
            }
            _ => vec![("default", "Default"), ("plan", "Plan")],
        };
        let values: Vec<SessionConfigSelectOption> = values
            .into_iter()
            .map(|(v, n)| SessionConfigSelectOption::new(v, n))
            .collect();
        SessionConfigOption::new(
            id,
            id,
            SessionConfigKind::Select(SessionConfigSelect::new(current, values)),
        )
        .category(category)
    }

    fn choices() -> Choices {
        Choices {
            options: vec![
                select("model", SessionConfigOptionCategory::Model, "small"),
                select("effort", SessionConfigOptionCategory::ThoughtLevel, "off"),
                select("mode", SessionConfigOptionCategory::Mode, "default"),
            ],
            modes: None,
        }
    }

    fn opts(model: Option<&str>, thinking: Option<bool>, agent: Option<&str>) -> TurnOptions {
        TurnOptions {
            model: model.map(String::from),
            thinking,
            agent: agent.map(String::from),
        }
    }

    fn set(id: &str, value: &str) -> Change {
        Change::Option {
            id: id.into(),
            value: SessionConfigOptionValue::from(value),
        }
    }

    #[test]
    fn what_the_agent_offers_is_listed_by_message_field() {
        let listed = offered(&choices());
        let fields: Vec<(&str, Option<&str>, usize)> = listed
            .options
            .iter()
            .map(|s| (s.id.as_str(), s.current.as_deref(), s.values.len()))
            .collect();
        assert_eq!(
            fields,
            [
                ("model", Some("small"), 2),
                ("agent", Some("default"), 2),
                ("thinking", Some("off"), 3)
            ]
        );
        assert_eq!(listed.options[0].values[1].name, "Large model");
        assert!(offered(&Choices::default()).options.is_empty());
    }

    #[test]
    fn options_map_to_config_changes_by_category() {
        let changes =
            plan(&choices(), &opts(Some("large"), Some(true), Some("Plan"))).expect("planned");
        assert_eq!(
            changes,
            vec![
                set("model", "large"),
                set("mode", "plan"),
                set("effort", "low")
            ]
        );
    }

    #[test]
    fn values_already_current_need_no_change() {
        let changes = plan(
            &choices(),
            &opts(Some("Small model"), Some(false), Some("default")),
        );
        assert_eq!(changes.expect("planned"), vec![]);
        assert_eq!(
            plan(&choices(), &TurnOptions::default()).expect("planned"),
            vec![]
        );
    }

    #[test]
    fn unknown_values_are_refused_with_the_offered_list() {
        let err = plan(&choices(), &opts(Some("gpt-9"), None, None)).expect_err("refused");
        assert!(
            err.contains("\"gpt-9\"") && err.contains("small, large"),
            "{err}"
        );
        let err = plan(&choices(), &opts(None, None, Some("yolo"))).expect_err("refused");
        assert!(err.contains("default, plan"), "{err}");
    }

    #[test]
    fn agents_without_a_setting_refuse_model_and_agent_but_ignore_thinking() {
        let none = Choices::default();
        assert!(
            plan(&none, &opts(Some("m"), None, None))
                .expect_err("refused")
                .contains("model")
        );
        assert!(
            plan(&none, &opts(None, None, Some("plan")))
                .expect_err("refused")
                .contains("modes")
        );
        assert_eq!(
            plan(&none, &opts(None, Some(true), None)).expect("planned"),
            vec![]
        );
    }

    #[test]
    fn legacy_modes_serve_agent_when_no_mode_option_exists() {
        let modes = SessionModeState::new(
            "default",
            vec![
                SessionMode::new("default", "Default"),
                SessionMode::new("acceptEdits", "Accept edits"),
            ],
        );
        let c = Choices {
            options: vec![],
            modes: Some(modes),
        };
        assert_eq!(
            plan(&c, &opts(None, None, Some("accept edits"))).expect("planned"),
            vec![Change::Mode("acceptEdits".into())]
        );
        assert_eq!(
            plan(&c, &opts(None, None, Some("default"))).expect("planned"),
            vec![]
        );
    }

    #[test]
    fn thinking_toggles_a_boolean_or_picks_an_on_or_off_level() {
        let boolean = SessionConfigOption::new(
            "think",
            "Think",
            SessionConfigKind::Boolean(SessionConfigBoolean::new(false)),
        )
        .category(SessionConfigOptionCategory::ThoughtLevel);
        let c = Choices {
            options: vec![boolean],
            modes: None,
        };
        assert_eq!(
            plan(&c, &opts(None, Some(true), None)).expect("planned"),
            vec![Change::Option {
                id: "think".into(),
                value: SessionConfigOptionValue::from(true)
            }]
        );
        assert_eq!(
            plan(&c, &opts(None, Some(false), None)).expect("planned"),
            vec![]
        );
        let high = Choices {
            options: vec![select(
                "effort",
                SessionConfigOptionCategory::ThoughtLevel,
                "high",
            )],
            modes: None,
        };
        assert_eq!(
            plan(&high, &opts(None, Some(true), None)).expect("planned"),
            vec![]
        );
        assert_eq!(
            plan(&high, &opts(None, Some(false), None)).expect("planned"),
            vec![set("effort", "off")]
        );
    }
}
