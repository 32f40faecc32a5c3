//! Bending the policy's preferred arguments into whatever JSON schema the client declared for a tool, so
//! every call the scripted model makes validates against the offered schema.

use serde_json::{Map, Number, Value};

/// Keeps only the keys the schema declares (when it declares any), then conforms the result to the schema:
/// missing required properties get a default, types are coerced, enums and bounds respected.
pub(crate) fn arguments_for(schema: &Value, preferred: Value) -> Value {
    let preferred = match (
        preferred,
        schema.get("properties").and_then(Value::as_object),
    ) {
        (Value::Object(map), Some(properties)) => Value::Object(
            map.into_iter()
                .filter(|(key, _)| properties.contains_key(key))
                .collect(),
        ),
        (other, _) => other,
    };
    conform(preferred, schema)
}

/// Returns a value that satisfies `schema` as closely to `value` as the schema allows.
pub(crate) fn conform(value: Value, schema: &Value) -> Value {
    let Some(schema) = schema.as_object() else {
        // `true`, `{}` or a missing schema accept anything.
        return value;
    };
    if let Some(constant) = schema.get("const") {
        return constant.clone();
    }
    if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
        if choices.contains(&value) {
            return value;
        }
        return choices.first().cloned().unwrap_or(Value::Null);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = schema.get(key).and_then(Value::as_array) {
            let branch = branches
                .iter()
                .find(|branch| type_fits(&value, branch))
                .or_else(|| branches.first());
            if let Some(branch) = branch {
                return conform(value, branch);
            }
        }
    }
    let value = match schema.get("allOf").and_then(Value::as_array) {
        Some(parts) => parts.iter().fold(value, conform),
        None => value,
    };
    match chosen_type(&value, schema).as_deref() {
        Some("object") => conform_object(value, schema),
        Some("array") => conform_array(value, schema),
        Some("string") => conform_string(value, schema),
        Some("integer") => conform_number(value, schema, true),
        Some("number") => conform_number(value, schema, false),
        Some("boolean") => Value::Bool(match value {
            Value::Bool(flag) => flag,
            Value::String(text) => text.eq_ignore_ascii_case("true"),
            _ => false,
        }),
        Some("null") => Value::Null,
        _ => value,
    }
}

/// A value for a property the caller did not supply.
pub(crate) fn default_for(schema: &Value) -> Value {
    if let Some(default) = schema.get("default") {
        return conform(default.clone(), schema);
    }
    let seed = match declared_types(schema).first().map(String::as_str) {
        Some("object") => Value::Object(Map::new()),
        Some("array") => Value::Array(Vec::new()),
        Some("string") => Value::String(String::new()),
        Some("integer") | Some("number") => Value::from(0),
        Some("boolean") => Value::Bool(false),
        _ if schema.get("properties").is_some() => Value::Object(Map::new()),
        _ => Value::Null,
    };
    conform(seed, schema)
}

fn declared_types(schema: &Value) -> Vec<String> {
    match schema.get("type") {
        Some(Value::String(kind)) => vec![kind.clone()],
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

fn value_type_fits(value: &Value, kind: &str) -> bool {
    match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.as_i64().is_some() || value.as_u64().is_some(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    }
}

fn type_fits(value: &Value, schema: &Value) -> bool {
    let kinds = declared_types(schema);
    kinds.is_empty() || kinds.iter().any(|kind| value_type_fits(value, kind))
}

/// The schema type to coerce to: the value's own when the schema allows it, else the first non-null one.
fn chosen_type(value: &Value, schema: &Map<String, Value>) -> Option<String> {
    let schema_value = Value::Object(schema.clone());
    let kinds = declared_types(&schema_value);
    if kinds.is_empty() {
        return schema
            .contains_key("properties")
            .then(|| "object".to_owned());
    }
    if let Some(kind) = kinds.iter().find(|kind| value_type_fits(value, kind)) {
        return Some(kind.clone());
    }
    kinds
        .iter()
        .find(|kind| kind.as_str() != "null")
        .or_else(|| kinds.first())
        .cloned()
}

fn conform_object(value: Value, schema: &Map<String, Value>) -> Value {
    let mut object = match value {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    let empty = Map::new();
    let properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let additional = schema.get("additionalProperties");
    let keys: Vec<String> = object.keys().cloned().collect();
    for key in keys {
        let Some(current) = object.remove(&key) else {
            continue;
        };
        if let Some(property) = properties.get(&key) {
            object.insert(key, conform(current, property));
        } else {
            match additional {
                Some(Value::Bool(false)) => {}
                Some(extra @ Value::Object(_)) => {
                    object.insert(key, conform(current, extra));
                }
                _ => {
                    object.insert(key, current);
                }
            }
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for key in required.iter().filter_map(Value::as_str) {
            if !object.contains_key(key) {
                let property = properties.get(key).cloned().unwrap_or(Value::Null);
                object.insert(key.to_owned(), default_for(&property));
            }
        }
    }
    Value::Object(object)
}

fn conform_array(value: Value, schema: &Map<String, Value>) -> Value {
    let mut items = match value {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    let item_schema = schema.get("items").cloned().unwrap_or(Value::Bool(true));
    items = items
        .into_iter()
        .map(|item| conform(item, &item_schema))
        .collect();
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
        items.truncate(usize::try_from(max).unwrap_or(usize::MAX));
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
        while (items.len() as u64) < min {
            items.push(default_for(&item_schema));
        }
    }
    Value::Array(items)
}

fn conform_string(value: Value, schema: &Map<String, Value>) -> Value {
    let mut text = match value {
        Value::String(text) => text,
        Value::Null => String::new(),
        other => other.to_string(),
    };
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        if text.chars().count() > max {
            text = text.chars().take(max).collect();
        }
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
        let min = usize::try_from(min).unwrap_or(0);
        while text.chars().count() < min {
            text.push('-');
        }
    }
    Value::String(text)
}

fn conform_number(value: Value, schema: &Map<String, Value>, integer: bool) -> Value {
    let mut number = match &value {
        Value::Number(number) => number.as_f64().unwrap_or(0.0),
        Value::String(text) => text.trim().parse::<f64>().unwrap_or(0.0),
        Value::Bool(flag) => f64::from(u8::from(*flag)),
        _ => 0.0,
    };
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    // An integer step keeps exclusive bounds honest; for numbers a small fraction does.
    let step = if integer { 1.0 } else { 1e-6 };
    if let Some(min) = bound("minimum") {
        number = number.max(min);
    }
    if let Some(min) = bound("exclusiveMinimum") {
        if number <= min {
            number = min + step;
        }
    }
    if let Some(max) = bound("maximum") {
        number = number.min(max);
    }
    if let Some(max) = bound("exclusiveMaximum") {
        if number >= max {
            number = max - step;
        }
    }
    if integer {
        let mut whole = number.round();
        // Rounding may step over a bound (minimum 0.5 → 1 is fine, maximum 2.5 → 3 is not).
        if bound("maximum").is_some_and(|max| whole > max) {
            whole = number.floor();
        }
        if bound("minimum").is_some_and(|min| whole < min) {
            whole = number.ceil();
        }
        Value::from(whole as i64)
    } else {
        Number::from_f64(number)
            .map(Value::Number)
            .unwrap_or_else(|| Value::from(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fills_required_and_drops_undeclared_keys() {
        let schema = json!({
            "type": "object",
            "properties": {
                "seconds": {"type": "integer", "minimum": 1, "maximum": 30},
                "reason": {"type": "string", "maxLength": 5},
                "mode": {"type": "string", "enum": ["fast", "slow"]}
            },
            "required": ["seconds", "mode"],
            "additionalProperties": false
        });
        let args = arguments_for(
            &schema,
            json!({"seconds": 60, "reason": "a long reason", "extra": 1}),
        );
        assert_eq!(
            args,
            json!({"seconds": 30, "reason": "a lon", "mode": "fast"})
        );
    }

    #[test]
    fn coerces_types_and_nullable_unions() {
        let schema = json!({
            "type": "object",
            "properties": {
                "count": {"type": ["integer", "null"]},
                "ratio": {"type": "number", "exclusiveMinimum": 0},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "flag": {"anyOf": [{"type": "boolean"}, {"type": "string"}]}
            },
            "required": ["count", "ratio", "tags", "flag"]
        });
        let args = arguments_for(&schema, json!({"count": "7", "tags": [1]}));
        assert_eq!(args["count"], json!(7));
        assert!(args["ratio"].as_f64().is_some_and(|ratio| ratio > 0.0));
        assert_eq!(args["tags"], json!(["1"]));
        assert_eq!(args["flag"], json!(false));
    }
}
