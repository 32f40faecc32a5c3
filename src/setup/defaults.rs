//! Files embedded in the binary, so a child that receives only the binary can set itself up.

/// The three laws; written read-only (0444) to `genesis/constitution.md`.
pub const CONSTITUTION: &str = include_str!("../../genesis/constitution.md");

/// The genesis prompt used when the creator gives none.
pub const GENESIS_PROMPT: &str = include_str!("../../genesis/prompt.md");

/// Written to `heartbeat.yaml` at setup.
pub const HEARTBEAT_EXAMPLE: &str = include_str!("../../heartbeat.yaml.example");

/// Default skills: (directory name, `SKILL.md` contents).
pub const SKILLS: &[(&str, &str)] = &[
    (
        "earning-with-a-paid-service",
        include_str!("../../skills/earning-with-a-paid-service/SKILL.md"),
    ),
    (
        "money-and-survival",
        include_str!("../../skills/money-and-survival/SKILL.md"),
    ),
    (
        "renting-compute",
        include_str!("../../skills/renting-compute/SKILL.md"),
    ),
    (
        "summarise-text",
        include_str!("../../skills/summarise-text/SKILL.md"),
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skills_have_front_matter_named_like_their_directory() {
        for (dir, text) in SKILLS {
            let front = text
                .strip_prefix("---\n")
                .and_then(|rest| rest.split("\n---\n").next())
                .unwrap_or_else(|| panic!("{dir}: no front matter"));
            assert!(front.contains(&format!("name: {dir}")), "{dir}");
            assert!(front.contains("description: "), "{dir}");
        }
    }

    #[test]
    fn heartbeat_example_is_valid_yaml_with_entries() {
        let value: serde_json::Value = crate::config::yaml::from_str(HEARTBEAT_EXAMPLE).unwrap();
        let entries = value["entries"].as_array().unwrap();
        assert!(entries.iter().any(|e| e["task"] == "status_refresh"));
        assert!(entries.iter().any(|e| e["task"] == "wake_agent"));
    }
}
