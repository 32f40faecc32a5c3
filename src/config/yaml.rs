//! The one place that speaks YAML: parsing with error locations and key paths, and serialising.
//!
//! serde_yaml is deprecated upstream; keeping it behind this module means swapping it touches one file.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Where and why a YAML document failed to parse into the expected shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// 1-based line, when the parser knows it.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path to the offending value (`inference.model`), including the unknown key itself.
    pub key: Option<String>,
    /// The parser's message without its own location suffix.
    pub message: String,
}

/// Parses `text` into `T`, tracking the key path so errors can name the key as well as the line.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let location = inner.location();
        let message = strip_location(&inner.to_string());
        let key = key_path(&path, &message);
        YamlError {
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            key,
            message,
        }
    })
}

/// Parses `text` into an untyped JSON value (used to merge layers key by key). An empty document is `{}`.
pub fn to_json_value(text: &str) -> Result<serde_json::Value, YamlError> {
    let value: serde_json::Value = from_str(text)?;
    Ok(if value.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        value
    })
}

/// Parses a single scalar as YAML would (`5` → number, `true` → bool, `foo` → string), for env and flag overrides.
pub fn scalar_to_json(text: &str) -> serde_json::Value {
    serde_yaml::from_str::<serde_json::Value>(text)
        .unwrap_or_else(|_| serde_json::Value::String(text.to_string()))
}

/// Serialises `value` as a YAML document.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, YamlError> {
    serde_yaml::to_string(value).map_err(|err| YamlError {
        line: None,
        column: None,
        key: None,
        message: err.to_string(),
    })
}

/// serde_yaml prefixes the key path ("inference.model: ") and appends " at line L column C"; the caller
/// prints both its own way.
fn strip_location(message: &str) -> String {
    let message = match message.rfind(" at line ") {
        Some(idx) => &message[..idx],
        None => message,
    };
    let message = match message.split_once(": ") {
        Some((prefix, rest))
            if !prefix.is_empty()
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c)) =>
        {
            rest
        }
        _ => message,
    };
    message.to_string()
}

/// serde_path_to_error stops at the map holding an unknown key; the key's own name is in the message.
fn key_path(path: &str, message: &str) -> Option<String> {
    let parent = if path == "." || path.is_empty() {
        None
    } else {
        Some(path.to_string())
    };
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
        .map(str::to_string);
    match (parent, unknown) {
        (Some(parent), Some(field)) if !parent.ends_with(&field) => {
            Some(format!("{parent}.{field}"))
        }
        (Some(parent), _) => Some(parent),
        (None, Some(field)) => Some(field),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Inner,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        #[serde(default)]
        count: u32,
    }

    #[test]
    fn unknown_nested_key_names_line_and_full_path() {
        let err = from_str::<Outer>("name: x\ninner:\n  count: 1\n  cuont: 2\n").unwrap_err();
        assert_eq!(err.line, Some(4), "{err:?}");
        assert_eq!(err.key.as_deref(), Some("inner.cuont"), "{err:?}");
        assert!(err.message.starts_with("unknown field `cuont`"), "{err:?}");
    }

    #[test]
    fn unknown_top_level_key() {
        let err = from_str::<Outer>("name: x\nbogus: 1\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err:?}");
        assert_eq!(err.key.as_deref(), Some("bogus"), "{err:?}");
    }

    #[test]
    fn wrong_type_names_key() {
        let err = from_str::<Outer>("name: x\ninner:\n  count: lots\n").unwrap_err();
        assert_eq!(err.line, Some(3), "{err:?}");
        assert_eq!(err.key.as_deref(), Some("inner.count"), "{err:?}");
    }

    #[test]
    fn scalars_parse_like_yaml() {
        assert_eq!(scalar_to_json("5"), serde_json::json!(5));
        assert_eq!(scalar_to_json("true"), serde_json::json!(true));
        assert_eq!(scalar_to_json("gpt-4o"), serde_json::json!("gpt-4o"));
    }
}
