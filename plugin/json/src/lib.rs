//! Untrusted text, read strictly and quoted briefly. Shared by the engine and the `lwi` command, so
//! that a document means the same to both.
//!
//! - [`parse`]: JSON as serde_json reads it, refusing what serde_json lets through: a key given
//!   twice in one object (serde_json keeps the last, silently) and nesting deeper than [`MAX_DEPTH`].
//! - [`quote`]: how a message shows a piece of input: escaped, at most [`QUOTE_CHARS`] characters.
//! - [`shorten_quotes`]: the same bound on a message worded by a parser (serde's "unknown field
//!   `…`", "invalid type: string \"…\"") that quotes the input whole.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// The deepest nesting of arrays and objects a document may have. lwi's documents nest four
/// levels at most; the bound keeps recursive code (parsing, dropping, converting) off the stack's edge.
pub const MAX_DEPTH: usize = 64;

/// The most characters of an input a message quotes.
pub const QUOTE_CHARS: usize = 64;

/// `text` as a message shows it: in double quotes, escaped (control characters, quotes,
/// backslashes), cut to [`QUOTE_CHARS`] characters with "…" and the full length in bytes.
pub fn quote(text: &str) -> String {
    let mut out = String::from("\"");
    for (shown, c) in text.chars().enumerate() {
        if shown == QUOTE_CHARS {
            out.push_str(&format!("…\" ({} bytes)", text.len()));
            return out;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// `message` with every run between backticks or double quotes longer than [`QUOTE_CHARS`]
/// characters cut as [`quote`] cuts it, and control characters escaped: parsers quote input whole.
pub fn shorten_quotes(message: &str) -> String {
    let chars: Vec<char> = message.chars().collect();
    let mut out = String::with_capacity(message.len().min(4 * QUOTE_CHARS));
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '`' || c == '"' {
            // The closing mark: the next one not escaped by a backslash (serde escapes within "…").
            let mut j = i + 1;
            while j < chars.len() && (chars[j] != c || (c == '"' && chars[j - 1] == '\\')) {
                j += 1;
            }
            let run: String = chars[i + 1..j.min(chars.len())].iter().collect();
            if run.chars().count() > QUOTE_CHARS {
                out.push_str(&quote(&run));
            } else {
                out.push(c);
                run.chars().for_each(|r| push_plain(&mut out, r));
                if j < chars.len() {
                    out.push(c);
                }
            }
            i = j + 1;
        } else {
            push_plain(&mut out, c);
            i += 1;
        }
    }
    out
}

/// Appends `c`, escaped if it is a control character (printable text, any script, stays as it is).
fn push_plain(out: &mut String, c: char) {
    if c.is_control() {
        out.extend(c.escape_debug());
    } else {
        out.push(c);
    }
}

/// Parses a JSON document, refusing a key given twice in one object and nesting deeper than
/// [`MAX_DEPTH`]; the error says which key and where (line and column).
pub fn parse(text: &str) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Strict { depth: 0 }.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// [`parse`] over bytes, which must be UTF-8.
pub fn parse_slice(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict { depth: 0 }.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Builds a [`Value`] as serde_json's own visitor does, with the two refusals.
struct Strict {
    depth: usize,
}

impl Strict {
    fn nested<E: de::Error>(&self) -> Result<Strict, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format!(
                "nested more than {MAX_DEPTH} levels deep"
            )));
        }
        Ok(Strict {
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.nested()?)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {}", quote(&key))));
            }
            let value = map.next_value_seed(self.nested()?)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_twice_is_refused_naming_it_and_where() {
        let e = parse(r#"{"device": "cpu", "device": "cpu"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "duplicate key \"device\" at line 1 column 26",
            "{e}"
        );
        let e = parse(r#"{"a": {"b": 1, "b": 2}}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate key \"b\""), "{e}");
        // The same key in two objects is no duplicate.
        let v = parse(r#"[{"a": 1}, {"a": 2}, {"x": {"a": 3}, "a": 4}]"#).unwrap();
        assert_eq!(v[2]["a"], 4);
        assert_eq!(parse_slice(b" {\"n\": 1.5e3} ").unwrap()["n"], 1500.0);
    }

    #[test]
    fn nesting_is_bounded_without_touching_the_stack_limit() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(parse(&deep(MAX_DEPTH)).is_ok());
        let e = parse(&deep(MAX_DEPTH + 1)).unwrap_err();
        assert!(e.to_string().contains("nested more than 64"), "{e}");
        // Far deeper input fails as early, without recursing through it.
        let e = parse(&deep(1_000_000)).unwrap_err();
        assert!(e.to_string().contains("nested more than"), "{e}");
        let objects = format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
        assert!(parse(&objects).is_err());
    }

    #[test]
    fn input_is_quoted_short_and_escaped() {
        assert_eq!(quote("cpu"), "\"cpu\"");
        assert_eq!(quote("a\"b\n\u{1b}"), "\"a\\\"b\\n\\u{1b}\"");
        let long = "é".repeat(50_000_000);
        let q = quote(&long);
        assert!(
            q.starts_with("\"éé") && q.ends_with("…\" (100000000 bytes)"),
            "{q}"
        );
        assert_eq!(q.chars().filter(|&c| c == 'é').count(), QUOTE_CHARS);
        let message = format!(
            "unknown field `{}`, expected `a` or \"b\"; invalid type: string \"{}\"",
            "k".repeat(1000),
            "v\\\"".repeat(1000)
        );
        let short = shorten_quotes(&message);
        assert!(short.len() < 300, "{short}");
        assert!(short.starts_with("unknown field \"kkkk"), "{short}");
        assert!(
            short.contains("(1000 bytes), expected `a` or \"b\"; invalid type: string \"v\\\\\\\"")
        );
        assert_eq!(shorten_quotes("a `b` \"c\"\n"), "a `b` \"c\"\\n");
        assert_eq!(shorten_quotes("unclosed `x"), "unclosed `x");
    }
}
