//! Options and configuration documents (engine, segment, training, import, phantom, evaluate):
//! JSON objects, and only objects. serde would read a JSON array positionally into a struct
//! (`[0.25, "constant"]` as overlap 0.25), so every place where an object is expected — the
//! document and each nested struct — is checked first, and an array there is an error naming it.

use crate::error::{Error, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Parses `json` (empty text: the defaults) into `T`; `what` names the document in messages.
pub fn parse<T: DeserializeOwned + Serialize + Default>(json: &str, what: &str) -> Result<T> {
    if json.trim().is_empty() {
        return Ok(T::default());
    }
    let shape = serde_json::to_value(T::default()).map_err(|e| Error::internal(e.to_string()))?;
    parse_shaped(json, what, &shape)
}

/// Parses `json` into `T`, refusing anything but an object wherever `shape` (a document of the same
/// layout, e.g. the defaults) holds one.
pub fn parse_shaped<T: DeserializeOwned>(json: &str, what: &str, shape: &Value) -> Result<T> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| Error::invalid(format!("{what}: {e}")))?;
    objects_where_expected(&value, shape, what)?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        if at == "." {
            Error::invalid(format!("{what}: {}", e.inner()))
        } else {
            Error::invalid(format!("{what}: \"{at}\": {}", e.inner()))
        }
    })
}

fn objects_where_expected(value: &Value, shape: &Value, at: &str) -> Result<()> {
    let Value::Object(fields) = shape else {
        return Ok(());
    };
    let Value::Object(given) = value else {
        return Err(Error::invalid(format!(
            "{at} must be a JSON object {{\"name\": value, …}}, got {}",
            describe(value)
        )));
    };
    for (key, v) in given {
        if let Some(s) = fields.get(key) {
            objects_where_expected(v, s, &format!("{at}: \"{key}\""))?;
        }
    }
    Ok(())
}

fn describe(v: &Value) -> String {
    let text = v.to_string();
    let short: String = text.chars().take(40).collect();
    let kind = match v {
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
        Value::Object(_) => "an object",
    };
    if short.len() < text.len() {
        format!("{kind} ({short}…)")
    } else {
        format!("{kind} ({short})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        a: f64,
        list: Vec<i64>,
    }
    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Outer {
        x: f64,
        inner: Inner,
    }

    #[test]
    fn arrays_are_refused_where_objects_belong_and_kept_where_lists_do() {
        let e = parse::<Outer>("[0.25, {}]", "test options").unwrap_err();
        assert!(
            e.message.contains("test options must be a JSON object"),
            "{}",
            e.message
        );
        let e = parse::<Outer>(r#"{"inner": [1.0, []]}"#, "test options").unwrap_err();
        assert!(e.message.contains("\"inner\""), "{}", e.message);
        let e = parse::<Outer>(r#"{"inner": {"a": "fast"}}"#, "t").unwrap_err();
        assert!(e.message.contains("\"inner.a\""), "{}", e.message);
        let ok: Outer = parse(r#"{"inner": {"list": [1, 2]}}"#, "t").unwrap();
        assert_eq!(ok.inner.list, vec![1, 2]);
        assert_eq!(parse::<Outer>("  ", "t").unwrap(), Outer::default());
        assert!(parse::<Outer>("3", "t").is_err());
    }
}
