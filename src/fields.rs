//! The fields validation's built-in checks read: each value as far as a check looks at it (its
//! JSON kind, a number, a role), everything else skipped with [`IgnoredAny`], without building
//! a tree.
//!
//! They are gathered in the request view's own typed pass over the body (`crate::request`)
//! when the view is parsed for validation ([`EnsureView`](crate::request::EnsureView)), so the
//! body is read once; [`Fields::parse`] runs the same pass for a body whose view was parsed
//! without them. This module holds what the pass fills in and the rules of a chat message
//! ([`fault_of`]).

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Number;

use crate::request::{skip_others, ParseError};

/// A value as the checks see it: its JSON kind, and the number when it is one.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Shallow {
    Null,
    Bool,
    Number(Number),
    Str { empty: bool },
    Array { empty: bool },
    Object,
}

impl Shallow {
    /// The kind, as the messages name it ("a string", "an array", ...).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Shallow::Null => "null",
            Shallow::Bool => "a boolean",
            Shallow::Number(_) => "a number",
            Shallow::Str { .. } => "a string",
            Shallow::Array { .. } => "an array",
            Shallow::Object => "an object",
        }
    }

    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Shallow::Null)
    }
}

pub(crate) struct ShallowVisitor;

impl<'de> Visitor<'de> for ShallowVisitor {
    type Value = Shallow;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shallow, E> {
        Ok(Shallow::Bool)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Shallow, E> {
        Ok(Shallow::Number(n.into()))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Shallow, E> {
        Ok(Shallow::Number(n.into()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Shallow, E> {
        Number::from_f64(n)
            .map(Shallow::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Shallow, E> {
        Ok(Shallow::Str {
            empty: s.is_empty(),
        })
    }
    fn visit_unit<E: de::Error>(self) -> Result<Shallow, E> {
        Ok(Shallow::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shallow, A::Error> {
        let empty = seq.next_element::<IgnoredAny>()?.is_none();
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Shallow::Array { empty })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shallow, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Shallow::Object)
    }
}

impl<'de> de::Deserialize<'de> for Shallow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShallowVisitor)
    }
}

/// The roles a chat message may have.
const ROLES: [&str; 6] = [
    "system",
    "user",
    "assistant",
    "tool",
    "developer",
    "function",
];

/// A message's `role` as read.
pub(crate) enum Role {
    Known(&'static str),
    /// A string that is no role, cut to 64 characters for the message.
    Unknown(String),
    Null,
    Other(&'static str),
}

impl Role {
    /// The role a string names, or the string (cut to 64 characters) when it names none.
    pub(crate) fn of(s: &str) -> Role {
        match ROLES.iter().find(|r| **r == s) {
            Some(r) => Role::Known(r),
            None => Role::Unknown(truncate(s, 64).to_owned()),
        }
    }
}

impl<'de> de::Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Role;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Role, E> {
                Ok(Role::of(s))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Role, E> {
                Ok(Role::Null)
            }
            skip_others!(Role::Other("a boolean") => bool);
            skip_others!(Role::Other("a number") => i64 u64 f64);
            skip_others!(Role::Other("an array") => seq);
            skip_others!(Role::Other("an object") => map);
        }
        d.deserialize_any(V)
    }
}

/// The first thing wrong with a chat message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fault {
    /// The message is no object; the kind it is.
    NotObject(&'static str),
    /// The role is a string that names no role (cut to 64 characters).
    UnknownRole(String),
    /// No role, or a null one.
    MissingRole,
    /// The role is no string; the kind it is.
    RoleType(&'static str),
    /// The content is neither a string nor an array; the kind it is.
    ContentType(&'static str),
    /// The message needs content and has none; its role.
    ContentMissing(&'static str),
    /// A tool message without a string `tool_call_id`.
    ToolCallId,
}

/// The first thing wrong with a chat message of these `role`, `content` and `tool_call_id`
/// (each by its last occurrence, `None` when absent); `has_calls`: a non-null `tool_calls`,
/// `function_call` or `audio`.
pub(crate) fn fault_of(
    role: Option<Role>,
    content: Option<Shallow>,
    tool_call_id: Option<Shallow>,
    has_calls: bool,
) -> Option<Fault> {
    let role = match role {
        Some(Role::Known(r)) => r,
        Some(Role::Unknown(r)) => return Some(Fault::UnknownRole(r)),
        None | Some(Role::Null) => return Some(Fault::MissingRole),
        Some(Role::Other(kind)) => return Some(Fault::RoleType(kind)),
    };
    let content = content.filter(|c| !c.is_null());
    if let Some(c) = &content {
        if !matches!(c, Shallow::Str { .. } | Shallow::Array { .. }) {
            return Some(Fault::ContentType(c.kind()));
        }
    }
    if (role != "assistant" || !has_calls) && content.is_none() {
        return Some(Fault::ContentMissing(role));
    }
    if role == "tool" && !matches!(tool_call_id, Some(Shallow::Str { .. })) {
        return Some(Fault::ToolCallId);
    }
    None
}

/// `messages` as the checks see it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MessagesField {
    /// An array: its length, and the first message at fault (when messages are checked).
    Array {
        len: usize,
        fault: Option<(usize, Fault)>,
    },
    /// Any other value.
    Other(Shallow),
}

/// What is wrong with an item of `models`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ModelFault {
    Empty,
    NotString(&'static str),
}

/// `models` as the checks see it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ModelsField {
    /// An array, and its first item that is no model name.
    Array(Option<(usize, ModelFault)>),
    /// Any other value.
    Other(Shallow),
}

/// The fields the checks read; `None` where the body has no such key. A key that occurs twice
/// counts by its last occurrence.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Fields {
    pub(crate) model: Option<Shallow>,
    pub(crate) messages: Option<MessagesField>,
    pub(crate) prompt: Option<Shallow>,
    pub(crate) input: Option<Shallow>,
    pub(crate) previous_response_id: Option<Shallow>,
    pub(crate) conversation: Option<Shallow>,
    pub(crate) temperature: Option<Shallow>,
    pub(crate) top_p: Option<Shallow>,
    pub(crate) presence_penalty: Option<Shallow>,
    pub(crate) frequency_penalty: Option<Shallow>,
    pub(crate) n: Option<Shallow>,
    pub(crate) max_tokens: Option<Shallow>,
    pub(crate) max_completion_tokens: Option<Shallow>,
    pub(crate) max_output_tokens: Option<Shallow>,
    pub(crate) stream: Option<Shallow>,
    pub(crate) models: Option<ModelsField>,
}

impl Fields {
    /// The field of a parameter only the checks read: `previous_response_id`, `conversation`,
    /// `temperature`, `top_p`, `presence_penalty`, `frequency_penalty`, by index.
    pub(crate) fn param_mut(&mut self, i: usize) -> &mut Option<Shallow> {
        match i {
            0 => &mut self.previous_response_id,
            1 => &mut self.conversation,
            2 => &mut self.temperature,
            3 => &mut self.top_p,
            4 => &mut self.presence_penalty,
            _ => &mut self.frequency_penalty,
        }
    }

    /// Parses `body` for these fields alone (the view's own typed pass, its counts dropped).
    /// `Ok(None)` when it is JSON but no object; `scan_messages` checks each chat message
    /// (until the first at fault).
    pub(crate) fn parse(body: &[u8], scan_messages: bool) -> Result<Option<Fields>, ParseError> {
        crate::request::parse_fields(body, scan_messages)
    }
}

/// `s` cut to at most `max` characters.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Fields {
        Fields::parse(body.as_bytes(), true).unwrap().unwrap()
    }

    #[test]
    fn kinds_numbers_and_presence() {
        let f = parse(
            r#"{"model":"","temperature":2.5,"n":-3,"stream":null,"input":[],"x":{"model":1}}"#,
        );
        assert_eq!(f.model, Some(Shallow::Str { empty: true }));
        assert_eq!(
            f.temperature,
            Some(Shallow::Number(Number::from_f64(2.5).unwrap()))
        );
        assert_eq!(f.n, Some(Shallow::Number((-3i64).into())));
        assert_eq!(f.stream, Some(Shallow::Null));
        assert_eq!(f.input, Some(Shallow::Array { empty: true }));
        assert_eq!(f.prompt, None);
        assert!(Fields::parse(b"[1]", true).unwrap().is_none());
        assert!(Fields::parse(b"{\"a\":", true).is_err());
    }

    #[test]
    fn the_first_message_at_fault_is_found_and_the_last_key_counts() {
        let f = parse(
            r#"{"messages":[{"role":"user","content":"a"},{"role":"tool","content":"x"},{"role":"bot"}]}"#,
        );
        assert_eq!(
            f.messages,
            Some(MessagesField::Array {
                len: 3,
                fault: Some((1, Fault::ToolCallId))
            })
        );
        let f =
            parse(r#"{"messages":[{"role":"user","content":"a","content":null}],"messages":[]}"#);
        assert_eq!(
            f.messages,
            Some(MessagesField::Array {
                len: 0,
                fault: None
            })
        );
        let f = parse(r#"{"messages":[{"role":"user","content":"a","content":null}]}"#);
        assert_eq!(
            f.messages,
            Some(MessagesField::Array {
                len: 1,
                fault: Some((0, Fault::ContentMissing("user")))
            })
        );
    }
}
