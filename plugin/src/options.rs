//! Options and configuration documents (engine, segment, training, import, phantom, evaluate):
//! JSON objects, and only objects. serde would read a JSON array positionally into a struct
//! (`[0.25, "constant"]` as overlap 0.25), so every place where an object is expected — the
//! document and each nested struct — is checked first, and an array there is an error naming it.
//!
//! Every JSON document the engine reads goes through [`document`]: a key given twice is refused
//! (serde_json would keep the last silently), nesting is bounded, and messages quote input briefly.

use crate::error::{Error, Result, quote, shorten_quotes};
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

/// Reads a JSON document the way the engine reads every one: a key twice in one object or
/// nesting deeper than [`lwi_json::MAX_DEPTH`] is `InvalidArgument` naming the key or the depth;
/// `what` names the document in messages.
pub fn document(json: &str, what: &str) -> Result<Value> {
    lwi_json::parse(json).map_err(|e| Error::invalid(shorten_quotes(&format!("{what}: {e}"))))
}

/// [`document`], then `T` from it with serde (unknown keys, wrong types: messages naming the field).
pub fn from_document<T: DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    deserialize(document(json, what)?, what)
}

/// Parses `json` into `T`, refusing anything but an object wherever `shape` (a document of the same
/// layout, e.g. the defaults) holds one.
pub fn parse_shaped<T: DeserializeOwned>(json: &str, what: &str, shape: &Value) -> Result<T> {
    let value = document(json, what)?;
    objects_where_expected(&value, shape, what)?;
    deserialize(value, what)
}

/// `T` from a parsed document; serde's messages quote input whole, so they are shortened.
fn deserialize<T: DeserializeOwned>(value: Value, what: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        let message = if at == "." {
            format!("{what}: {}", e.inner())
        } else {
            format!("{what}: \"{at}\": {}", e.inner())
        };
        Error::invalid(shorten_quotes(&message))
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
            objects_where_expected(v, s, &format!("{at}: {}", quote(key)))?;
        }
    }
    Ok(())
}

/// A value as a message shows it: its kind and a short prefix of its JSON.
pub fn describe(v: &Value) -> String {
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
    fn a_key_twice_deep_nesting_and_huge_input_are_refused_briefly() {
        use crate::error::ErrorKind;
        let e = parse::<Outer>(r#"{"x": 1, "x": 1}"#, "test options").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(
            e.message
                .starts_with("test options: duplicate key \"x\" at line 1"),
            "{}",
            e.message
        );
        let e = parse::<Outer>(r#"{"inner": {"a": 1, "a": 2}}"#, "t").unwrap_err();
        assert!(e.message.contains("duplicate key \"a\""), "{}", e.message);
        let deep = format!(
            "{{\"inner\": {}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let e = parse::<Outer>(&deep, "t").unwrap_err();
        assert!(e.message.contains("nested more than"), "{}", e.message);
        // 100 MB keys and values come back as a prefix, not whole.
        let key = format!("{{\"{}\": 1}}", "k\\n".repeat(30 << 20));
        let e = parse::<Outer>(&key, "t").unwrap_err();
        assert!(
            e.message.len() < 400 && e.message.contains("unknown field \"k\\nk"),
            "{}",
            e.message
        );
        let value = format!("{{\"inner\": {{\"a\": \"{}\"}}}}", "v".repeat(100 << 20));
        let e = parse::<Outer>(&value, "t").unwrap_err();
        assert!(e.message.len() < 400, "{}", e.message);
        assert!(
            e.message
                .contains("\"inner.a\": invalid type: string \"vvv"),
            "{}",
            e.message
        );
        let e = parse::<Outer>(&format!("{{\"{}\": 1, {}", "k".repeat(100 << 20), "x"), "t");
        assert!(e.unwrap_err().message.len() < 400);
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
