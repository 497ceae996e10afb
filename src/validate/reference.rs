//! The checks as they were written over a `serde_json::Value` of the body, kept as the
//! reference the typed checks are tested against.

#![allow(clippy::all)]

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::error::{ApiError, ErrorCode};
use crate::request::{Endpoint, RequestView};

use super::config::Shared;

/// Whether `role` is one a chat message may have.
fn is_role(role: &str) -> bool {
    matches!(
        role,
        "system" | "user" | "assistant" | "tool" | "developer" | "function"
    )
}

/// Runs every configured check on a parsed request.
pub(crate) fn check(shared: &Shared, view: &RequestView, json: &Value) -> Result<(), ApiError> {
    let Some(obj) = json.as_object() else {
        // A view always holds an object; one without JSON has nothing to check.
        return Ok(());
    };
    let endpoint = view.endpoint();
    let checks = shared.checks;
    if checks.endpoint {
        check_endpoint(endpoint, obj)?;
    }
    if checks.required_fields {
        check_required(endpoint, obj, view.deployment().is_some())?;
    }
    if checks.params {
        check_params(obj)?;
    }
    if !checks.params && shared.models.is_some() {
        // The parameter checks look at `models` in their own pass.
        if let Some(models) = obj.get("models") {
            check_models_field(models)?;
        }
    }
    if checks.messages && endpoint == Endpoint::ChatCompletions {
        check_messages(obj)?;
    }
    if let Some((list, set)) = &shared.models {
        // Every model the upstream may use: the deployment in the path, the body's `model`,
        // and each of `models` (a repeat is looked up again, which costs less than a set).
        let sources = view
            .deployment()
            .map(|m| (m, Source::Deployment))
            .into_iter()
            .chain(view.model().map(|m| (m, Source::Model)))
            .chain(
                view.fallback_models()
                    .iter()
                    .map(|m| (&**m, Source::Models)),
            );
        for (model, source) in sources {
            if !set.contains(model) {
                return Err(model_not_supported(
                    model,
                    source,
                    list,
                    shared.max_listed_models,
                ));
            }
        }
    }
    if checks.context_length && endpoint != Endpoint::Embeddings {
        check_context(shared, endpoint, view)?;
    }
    Ok(())
}

fn check_endpoint(endpoint: Endpoint, obj: &Map<String, Value>) -> Result<(), ApiError> {
    match endpoint {
        Endpoint::Completions if obj.contains_key("messages") && !obj.contains_key("prompt") => {
            Err(ApiError::new(
                ErrorCode::InvalidValue,
                "`messages` is a chat parameter: send chat requests to /v1/chat/completions, \
                 or send a `prompt` to /v1/completions.",
            )
            .with_param("messages"))
        }
        Endpoint::ChatCompletions
            if obj.contains_key("prompt") && !obj.contains_key("messages") =>
        {
            Err(ApiError::new(
                ErrorCode::InvalidValue,
                "`prompt` is a parameter of the legacy completions endpoint /v1/completions; \
                 /v1/chat/completions takes `messages`, a list of {\"role\", \"content\"} objects.",
            )
            .with_param("prompt"))
        }
        _ => Ok(()),
    }
}

fn missing(field: &'static str, what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::MissingRequiredField,
        format!("Missing required parameter: `{field}` ({what})."),
    )
    .with_param(field)
}

fn check_required(
    endpoint: Endpoint,
    obj: &Map<String, Value>,
    deployment: bool,
) -> Result<(), ApiError> {
    match obj.get("model") {
        // The deployment in the path names the model.
        None | Some(Value::Null) if deployment => {}
        None | Some(Value::Null) => return Err(missing("model", "the model to use")),
        Some(Value::String(s)) if s.is_empty() => {
            return Err(missing("model", "the model to use, here empty"))
        }
        Some(Value::String(_)) => {}
        Some(other) => return Err(wrong_type("model", "a string", other)),
    }
    let present = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    match endpoint {
        Endpoint::ChatCompletions => {
            if !present("messages") {
                return Err(missing(
                    "messages",
                    "a list of {\"role\", \"content\"} objects",
                ));
            }
            match &obj["messages"] {
                Value::Array(a) if a.is_empty() => Err(ApiError::new(
                    ErrorCode::InvalidValue,
                    "Invalid `messages`: the list must hold at least one message.",
                )
                .with_param("messages")),
                Value::Array(_) => Ok(()),
                other => Err(wrong_type("messages", "an array of message objects", other)),
            }
        }
        Endpoint::Completions => {
            if !present("prompt") {
                return Err(missing("prompt", "the text to complete"));
            }
            match &obj["prompt"] {
                Value::String(_) | Value::Array(_) => Ok(()),
                other => Err(wrong_type("prompt", "a string or an array", other)),
            }
        }
        Endpoint::Embeddings => {
            if !present("input") {
                return Err(missing("input", "the text to embed"));
            }
            match &obj["input"] {
                Value::String(_) | Value::Array(_) => Ok(()),
                other => Err(wrong_type("input", "a string or an array", other)),
            }
        }
        Endpoint::Responses => {
            if !["input", "previous_response_id", "prompt", "conversation"]
                .iter()
                .any(|k| present(k))
            {
                return Err(missing("input", "the text or items to respond to"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_params(obj: &Map<String, Value>) -> Result<(), ApiError> {
    // One pass over the fields rather than a lookup per parameter.
    for (key, value) in obj {
        match key.as_str() {
            "temperature" => number_in("temperature", value, 0.0, 2.0)?,
            "top_p" => number_in("top_p", value, 0.0, 1.0)?,
            "presence_penalty" => number_in("presence_penalty", value, -2.0, 2.0)?,
            "frequency_penalty" => number_in("frequency_penalty", value, -2.0, 2.0)?,
            "n" => integer_at_least("n", value, 1)?,
            "max_tokens" => integer_at_least("max_tokens", value, 1)?,
            "max_completion_tokens" => integer_at_least("max_completion_tokens", value, 1)?,
            "max_output_tokens" => integer_at_least("max_output_tokens", value, 1)?,
            "models" => check_models_field(value)?,
            "stream" if !matches!(value, Value::Null | Value::Bool(_)) => {
                return Err(wrong_type("stream", "a boolean (true or false)", value));
            }
            _ => {}
        }
    }
    Ok(())
}

fn number_in(key: &'static str, value: &Value, lo: f64, hi: f64) -> Result<(), ApiError> {
    match value {
        Value::Null => Ok(()),
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if (lo..=hi).contains(&x) {
                Ok(())
            } else {
                Err(ApiError::new(
                    ErrorCode::InvalidValue,
                    format!(
                        "Invalid `{key}`: {n} is out of range; it must be between {lo} and {hi}."
                    ),
                )
                .with_param(key))
            }
        }
        other => Err(wrong_type(
            key,
            &format!("a number between {lo} and {hi}"),
            other,
        )),
    }
}

fn integer_at_least(key: &'static str, value: &Value, min: i64) -> Result<(), ApiError> {
    match value {
        Value::Null => Ok(()),
        Value::Number(n) => {
            let ok = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => i >= min,
                (None, Some(_)) => true,
                _ => false,
            };
            if ok {
                Ok(())
            } else if n.is_f64() {
                Err(ApiError::new(
                    ErrorCode::InvalidValue,
                    format!("Invalid `{key}`: {n} is not an integer; it must be an integer of at least {min}."),
                )
                .with_param(key))
            } else {
                Err(ApiError::new(
                    ErrorCode::InvalidValue,
                    format!("Invalid `{key}`: {n} is out of range; it must be an integer of at least {min}."),
                )
                .with_param(key))
            }
        }
        other => Err(wrong_type(
            key,
            &format!("an integer of at least {min}"),
            other,
        )),
    }
}

fn check_messages(obj: &Map<String, Value>) -> Result<(), ApiError> {
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        return Ok(());
    };
    for (i, m) in messages.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(ApiError::new(
                ErrorCode::InvalidValue,
                format!(
                    "Invalid `messages[{i}]`: expected a message object with `role` and `content`, got {}.",
                    kind(&messages[i])
                ),
            )
            .with_param(format!("messages[{i}]")));
        };
        // One pass over the message's fields.
        let (mut role, mut content, mut tool_call_id, mut has_calls) = (None, None, None, false);
        for (key, value) in m {
            match key.as_str() {
                "role" => role = Some(value),
                "content" => content = Some(value).filter(|c| !c.is_null()),
                "tool_call_id" => tool_call_id = Some(value),
                "tool_calls" | "function_call" | "audio" => has_calls |= !value.is_null(),
                _ => {}
            }
        }
        let role = match role {
            Some(Value::String(r)) if is_role(r) => r.as_str(),
            Some(Value::String(r)) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidValue,
                    format!(
                        "Invalid `messages[{i}].role`: {:?} is not a role; it must be one of \
                         system, user, assistant, tool, developer or function.",
                        truncate(r, 64)
                    ),
                )
                .with_param(format!("messages[{i}].role")))
            }
            None | Some(Value::Null) => {
                return Err(ApiError::new(
                    ErrorCode::MissingRequiredField,
                    format!("Missing required parameter: `messages[{i}].role`."),
                )
                .with_param(format!("messages[{i}].role")))
            }
            Some(other) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidValue,
                    format!(
                        "Invalid `messages[{i}].role`: expected a string (system, user, assistant, \
                         tool, developer or function), got {}.",
                        kind(other)
                    ),
                )
                .with_param(format!("messages[{i}].role")))
            }
        };
        if let Some(c) = content {
            if !matches!(c, Value::String(_) | Value::Array(_)) {
                return Err(ApiError::new(
                    ErrorCode::InvalidValue,
                    format!(
                        "Invalid `messages[{i}].content`: expected a string or an array of content \
                         parts, got {}.",
                        kind(c)
                    ),
                )
                .with_param(format!("messages[{i}].content")));
            }
        }
        let content_needed = role != "assistant" || !has_calls;
        if content_needed && content.is_none() {
            let why = if role == "assistant" {
                "an assistant message needs `content` unless it has `tool_calls`"
            } else {
                "this message needs `content`"
            };
            return Err(ApiError::new(
                ErrorCode::InvalidValue,
                format!("Invalid `messages[{i}].content`: {why} (role {role})."),
            )
            .with_param(format!("messages[{i}].content")));
        }
        if role == "tool" && !matches!(tool_call_id, Some(Value::String(_))) {
            return Err(ApiError::new(
                ErrorCode::InvalidValue,
                format!(
                    "Invalid `messages[{i}].tool_call_id`: a tool message needs the string id of \
                     the tool call it answers."
                ),
            )
            .with_param(format!("messages[{i}].tool_call_id")));
        }
    }
    Ok(())
}

/// `models` (OpenRouter-style fallbacks), when present, is a list of model names.
fn check_models_field(models: &Value) -> Result<(), ApiError> {
    let invalid = |what: &str| {
        Err(ApiError::new(
            ErrorCode::InvalidValue,
            format!("Invalid `models`: {what}; it must be a list of model names."),
        )
        .with_param("models"))
    };
    match models {
        Value::Null => Ok(()),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) if !s.is_empty() => {}
                    Value::String(_) => return invalid(&format!("`models[{i}]` is empty")),
                    other => {
                        return invalid(&format!("`models[{i}]` is {}, not a string", kind(other)))
                    }
                }
            }
            Ok(())
        }
        other => invalid(&format!("got {}", kind(other))),
    }
}

/// Where a model a request may use comes from.
#[derive(Clone, Copy)]
enum Source {
    /// The Azure-style deployment in the path.
    Deployment,
    /// The body's `model`.
    Model,
    /// The body's `models` array.
    Models,
}

fn model_not_supported(model: &str, source: Source, list: &[Box<str>], max: usize) -> ApiError {
    let (whence, param) = match source {
        Source::Deployment => (" (the deployment named in the path)", "model"),
        Source::Model => ("", "model"),
        Source::Models => (" (in `models`)", "models"),
    };
    let mut msg = format!(
        "The model {:?}{whence} is not supported here. Available models: ",
        truncate(model, 128)
    );
    for (i, m) in list.iter().take(max).enumerate() {
        if i > 0 {
            msg.push_str(", ");
        }
        msg.push_str(m);
    }
    if list.len() > max {
        let _ = write!(msg, " and {} more", list.len() - max);
    }
    msg.push('.');
    ApiError::new(ErrorCode::ModelNotSupported, msg).with_param(param)
}

fn check_context(shared: &Shared, endpoint: Endpoint, view: &RequestView) -> Result<(), ApiError> {
    // The model that serves: the deployment when the path names one.
    let Some(model) = view.routed_model() else {
        return Ok(());
    };
    let Some(window) = shared.context_window(model) else {
        return Ok(());
    };
    let prompt = view.prompt_tokens();
    let output = view.max_tokens().unwrap_or(0);
    let total = prompt.saturating_add(output);
    if total <= window {
        return Ok(());
    }
    let param = match endpoint {
        Endpoint::ChatCompletions => "messages",
        Endpoint::Completions => "prompt",
        _ => "input",
    };
    Err(ApiError::new(
        ErrorCode::ContextLengthExceeded,
        format!(
            "This model's maximum context length is {window} tokens. However, you requested \
             about {total} tokens ({prompt} estimated in the prompt, {output} in the completion). \
             Please reduce the length of the prompt or the completion."
        ),
    )
    .with_param(param))
}

fn wrong_type(key: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidValue,
        format!(
            "Invalid type for `{key}`: expected {expected}, got {}.",
            kind(got)
        ),
    )
    .with_param(key.to_owned())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
