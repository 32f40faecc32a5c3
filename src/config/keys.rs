//! Declared config keys: each backend lists the settings it needs so the setup wizard is driven by data.

/// One setting a backend needs from the person setting the agent up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigKey {
    /// Dotted config key (`inference.base_url`) this answer is written to.
    pub name: &'static str,
    /// Question shown by the wizard.
    pub prompt: &'static str,
    pub default: Option<&'static str>,
    /// A secret is never asked for in clear: the wizard asks for the *name of the env var* holding it.
    pub secret: bool,
}
