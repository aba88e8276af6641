//! A job's arguments, kept as the JSON text they were read as.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A job's `spec.args`, kept as the JSON text it was read as and decoded only where it is used: into an in-process
/// handler's argument type, straight from the text. The HTTP executor sends the text as it is, and a Pod gets it in
/// `BGJOBS_ARGS`. Why not a `serde_json::Value`: a tenant may store 1.5 MB of arguments, and decoded into a `Value`
/// they take many times that (a number in an array, 32 bytes: about 32 MiB). Every replica reads a job whole at each
/// watch event, its claim and each report, and an attempt holds its job for its life: sixteen such jobs running on
/// one replica would take more memory than the chart gives it, and every replica that took them over after it was
/// killed, in turn. As text they weigh what they are stored as. Text is also read at any depth (serde_json decodes
/// 128 levels into a `Value`, and passes over a raw value without that limit).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Args(Box<RawValue>);

impl Args {
    /// The arguments' JSON text.
    pub fn text(&self) -> &str {
        self.0.get()
    }

    /// The arguments decoded into `T`, from the text (no `Value` on the way).
    pub fn decode<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.0.get())
    }

    /// The arguments as a JSON value, for a caller that compares or shows them (a client, never a replica's hot
    /// path). Err only for arguments nested deeper than serde_json decodes.
    pub fn value(&self) -> serde_json::Result<serde_json::Value> {
        self.decode()
    }
}

/// No arguments: an empty object, as a job without `args` gets.
impl Default for Args {
    fn default() -> Self {
        Args(RawValue::from_string("{}".into()).expect("an empty object is JSON"))
    }
}

impl From<serde_json::Value> for Args {
    fn from(value: serde_json::Value) -> Self {
        Args(RawValue::from_string(value.to_string()).expect("a JSON value's text is JSON"))
    }
}

/// The same text. The apiserver writes an object's maps with their keys sorted, as serde_json's `Value` does, so a
/// job's arguments as read and as made from the same `Value` have the same text.
impl PartialEq for Args {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arguments are kept as their text, whatever their depth, and decoded into the type that uses them.
    #[test]
    fn arguments_are_kept_as_text_and_decoded_into_what_uses_them() {
        let args: Args = serde_json::from_str(r#"{"b": [1, 2.5],  "a": {"c": "x"}}"#).unwrap();
        assert_eq!(args.text(), r#"{"b": [1, 2.5],  "a": {"c": "x"}}"#, "the text as it came");
        #[derive(Deserialize, PartialEq, Debug)]
        struct Wanted {
            b: Vec<f64>,
        }
        assert_eq!(args.decode::<Wanted>().unwrap(), Wanted { b: vec![1.0, 2.5] });
        assert_eq!(serde_json::to_string(&args).unwrap(), r#"{"b": [1, 2.5],  "a": {"c": "x"}}"#, "written back as is");
        let made = Args::from(serde_json::json!({"a": {"c": "x"}, "b": [1, 2.5]}));
        assert_eq!(made.text(), r#"{"a":{"c":"x"},"b":[1,2.5]}"#);
        let from_value: Args = serde_json::from_value(serde_json::json!({"b": 1})).unwrap();
        assert_eq!(from_value, Args::from(serde_json::json!({"b": 1})), "read from a value as from its text");
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(300), "]".repeat(300));
        let kept: Args = serde_json::from_str(&deep).expect("deeper than a Value is read");
        assert_eq!(kept.text(), deep);
        assert!(kept.value().is_err(), "too deep to decode into a Value");
    }
}
