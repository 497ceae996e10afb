//! The checks themselves: pure functions of the configuration, the request view and the
//! fields the checks read from the body ([`Fields`], a typed parse of their own).

use std::fmt::Write as _;

use http::HeaderMap;

use crate::error::{ApiError, ErrorCode};
use crate::request::{Endpoint, RequestView, ViewError};

use super::config::Shared;
use crate::fields::{truncate, Fault, Fields, MessagesField, ModelFault, ModelsField, Shallow};

/// `400 invalid_value` unless the `content-type` is `application/json` (any parameters).
pub(crate) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(http::header::CONTENT_TYPE) else {
        return Err(ApiError::new(
            ErrorCode::InvalidValue,
            "The request has no content-type; send the JSON body with \
             `content-type: application/json`.",
        ));
    };
    let essence = value
        .to_str()
        .ok()
        .map(|v| v.split(';').next().unwrap_or("").trim());
    match essence {
        Some(e) if e.eq_ignore_ascii_case("application/json") => Ok(()),
        Some(e) => Err(ApiError::new(
            ErrorCode::InvalidValue,
            format!(
                "The request content-type is {:?}; send the JSON body with \
                 `content-type: application/json`.",
                truncate(e, 64)
            ),
        )),
        None => Err(ApiError::new(
            ErrorCode::InvalidValue,
            "The request content-type is not readable text; send the JSON body with \
             `content-type: application/json`.",
        )),
    }
}

/// Runs every configured check on a parsed request. `fields` are the fields the checks read
/// when the view's pass gathered them; else `body`, the body the view was parsed from, is
/// parsed for them once, typed; without either only the checks of the view itself (allowed
/// models, context length) run.
pub(crate) fn check(
    shared: &Shared,
    view: &RequestView,
    body: Option<&[u8]>,
    fields: Option<&Fields>,
) -> Result<(), ApiError> {
    let endpoint = view.endpoint();
    let checks = shared.checks;
    if shared.reads_fields() {
        match (fields, body) {
            (Some(fields), _) => check_fields(shared, endpoint, view, fields)?,
            (None, Some(body)) => {
                let scan = checks.messages && endpoint == Endpoint::ChatCompletions;
                match Fields::parse(body, scan) {
                    Ok(Some(fields)) => check_fields(shared, endpoint, view, &fields)?,
                    // A view always comes from an object; a document that is none has nothing
                    // to check.
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(ViewError::Parse(e).to_api_error()),
                }
            }
            (None, None) => {}
        }
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

/// The checks of the body's fields, in their order.
fn check_fields(
    shared: &Shared,
    endpoint: Endpoint,
    view: &RequestView,
    f: &Fields,
) -> Result<(), ApiError> {
    let checks = shared.checks;
    if checks.endpoint {
        check_endpoint(endpoint, f)?;
    }
    if checks.required_fields {
        check_required(endpoint, f, view.deployment().is_some())?;
    }
    if checks.params {
        check_params(f)?;
    }
    if !checks.params && shared.models.is_some() {
        // The parameter checks look at `models` themselves.
        if let Some(models) = &f.models {
            check_models_field(models)?;
        }
    }
    if checks.messages && endpoint == Endpoint::ChatCompletions {
        if let Some(MessagesField::Array {
            fault: Some((i, fault)),
            ..
        }) = &f.messages
        {
            return Err(message_error(*i, fault));
        }
    }
    Ok(())
}

fn check_endpoint(endpoint: Endpoint, f: &Fields) -> Result<(), ApiError> {
    // Present, even as null.
    let (messages, prompt) = (f.messages.is_some(), f.prompt.is_some());
    match endpoint {
        Endpoint::Completions if messages && !prompt => Err(ApiError::new(
            ErrorCode::InvalidValue,
            "`messages` is a chat parameter: send chat requests to /v1/chat/completions, \
                 or send a `prompt` to /v1/completions.",
        )
        .with_param("messages")),
        Endpoint::ChatCompletions if prompt && !messages => Err(ApiError::new(
            ErrorCode::InvalidValue,
            "`prompt` is a parameter of the legacy completions endpoint /v1/completions; \
                 /v1/chat/completions takes `messages`, a list of {\"role\", \"content\"} objects.",
        )
        .with_param("prompt")),
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

/// Present and not null.
fn present(v: &Option<Shallow>) -> bool {
    v.as_ref().is_some_and(|v| !v.is_null())
}

fn check_required(endpoint: Endpoint, f: &Fields, deployment: bool) -> Result<(), ApiError> {
    match &f.model {
        // The deployment in the path names the model.
        None | Some(Shallow::Null) if deployment => {}
        None | Some(Shallow::Null) => return Err(missing("model", "the model to use")),
        Some(Shallow::Str { empty: true }) => {
            return Err(missing("model", "the model to use, here empty"))
        }
        Some(Shallow::Str { .. }) => {}
        Some(other) => return Err(wrong_type("model", "a string", other.kind())),
    }
    let text_or_array = |key: &'static str, v: &Shallow| match v {
        Shallow::Str { .. } | Shallow::Array { .. } => Ok(()),
        other => Err(wrong_type(key, "a string or an array", other.kind())),
    };
    match endpoint {
        Endpoint::ChatCompletions => match &f.messages {
            None | Some(MessagesField::Other(Shallow::Null)) => Err(missing(
                "messages",
                "a list of {\"role\", \"content\"} objects",
            )),
            Some(MessagesField::Array { len: 0, .. }) => Err(ApiError::new(
                ErrorCode::InvalidValue,
                "Invalid `messages`: the list must hold at least one message.",
            )
            .with_param("messages")),
            Some(MessagesField::Array { .. }) => Ok(()),
            Some(MessagesField::Other(other)) => Err(wrong_type(
                "messages",
                "an array of message objects",
                other.kind(),
            )),
        },
        Endpoint::Completions => match &f.prompt {
            Some(v) if !v.is_null() => text_or_array("prompt", v),
            _ => Err(missing("prompt", "the text to complete")),
        },
        Endpoint::Embeddings => match &f.input {
            Some(v) if !v.is_null() => text_or_array("input", v),
            _ => Err(missing("input", "the text to embed")),
        },
        Endpoint::Responses => {
            if ![
                &f.input,
                &f.previous_response_id,
                &f.prompt,
                &f.conversation,
            ]
            .into_iter()
            .any(present)
            {
                return Err(missing("input", "the text or items to respond to"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_params(f: &Fields) -> Result<(), ApiError> {
    // In the order of the keys' names, as they were always checked.
    let number = |key, v: &Option<Shallow>, lo, hi| match v {
        Some(v) => number_in(key, v, lo, hi),
        None => Ok(()),
    };
    let integer = |key, v: &Option<Shallow>| match v {
        Some(v) => integer_at_least(key, v, 1),
        None => Ok(()),
    };
    number("frequency_penalty", &f.frequency_penalty, -2.0, 2.0)?;
    integer("max_completion_tokens", &f.max_completion_tokens)?;
    integer("max_output_tokens", &f.max_output_tokens)?;
    integer("max_tokens", &f.max_tokens)?;
    if let Some(models) = &f.models {
        check_models_field(models)?;
    }
    integer("n", &f.n)?;
    number("presence_penalty", &f.presence_penalty, -2.0, 2.0)?;
    if let Some(v) = &f.stream {
        if !matches!(v, Shallow::Null | Shallow::Bool) {
            return Err(wrong_type("stream", "a boolean (true or false)", v.kind()));
        }
    }
    number("temperature", &f.temperature, 0.0, 2.0)?;
    number("top_p", &f.top_p, 0.0, 1.0)?;
    Ok(())
}

fn number_in(key: &'static str, value: &Shallow, lo: f64, hi: f64) -> Result<(), ApiError> {
    match value {
        Shallow::Null => Ok(()),
        Shallow::Number(n) => {
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
            other.kind(),
        )),
    }
}

fn integer_at_least(key: &'static str, value: &Shallow, min: i64) -> Result<(), ApiError> {
    match value {
        Shallow::Null => Ok(()),
        Shallow::Number(n) => {
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
            other.kind(),
        )),
    }
}

/// The envelope error for the message at `i`.
fn message_error(i: usize, fault: &Fault) -> ApiError {
    match fault {
        Fault::NotObject(kind) => ApiError::new(
            ErrorCode::InvalidValue,
            format!(
                "Invalid `messages[{i}]`: expected a message object with `role` and `content`, got {kind}."
            ),
        )
        .with_param(format!("messages[{i}]")),
        Fault::UnknownRole(r) => ApiError::new(
            ErrorCode::InvalidValue,
            format!(
                "Invalid `messages[{i}].role`: {r:?} is not a role; it must be one of \
                 system, user, assistant, tool, developer or function."
            ),
        )
        .with_param(format!("messages[{i}].role")),
        Fault::MissingRole => ApiError::new(
            ErrorCode::MissingRequiredField,
            format!("Missing required parameter: `messages[{i}].role`."),
        )
        .with_param(format!("messages[{i}].role")),
        Fault::RoleType(kind) => ApiError::new(
            ErrorCode::InvalidValue,
            format!(
                "Invalid `messages[{i}].role`: expected a string (system, user, assistant, \
                 tool, developer or function), got {kind}."
            ),
        )
        .with_param(format!("messages[{i}].role")),
        Fault::ContentType(kind) => ApiError::new(
            ErrorCode::InvalidValue,
            format!(
                "Invalid `messages[{i}].content`: expected a string or an array of content \
                 parts, got {kind}."
            ),
        )
        .with_param(format!("messages[{i}].content")),
        Fault::ContentMissing(role) => {
            let why = if *role == "assistant" {
                "an assistant message needs `content` unless it has `tool_calls`"
            } else {
                "this message needs `content`"
            };
            ApiError::new(
                ErrorCode::InvalidValue,
                format!("Invalid `messages[{i}].content`: {why} (role {role})."),
            )
            .with_param(format!("messages[{i}].content"))
        }
        Fault::ToolCallId => ApiError::new(
            ErrorCode::InvalidValue,
            format!(
                "Invalid `messages[{i}].tool_call_id`: a tool message needs the string id of \
                 the tool call it answers."
            ),
        )
        .with_param(format!("messages[{i}].tool_call_id")),
    }
}

/// `models` (OpenRouter-style fallbacks), when present, is a list of model names.
fn check_models_field(models: &ModelsField) -> Result<(), ApiError> {
    let invalid = |what: &str| {
        Err(ApiError::new(
            ErrorCode::InvalidValue,
            format!("Invalid `models`: {what}; it must be a list of model names."),
        )
        .with_param("models"))
    };
    match models {
        ModelsField::Other(Shallow::Null) | ModelsField::Array(None) => Ok(()),
        ModelsField::Array(Some((i, ModelFault::Empty))) => {
            invalid(&format!("`models[{i}]` is empty"))
        }
        ModelsField::Array(Some((i, ModelFault::NotString(kind)))) => {
            invalid(&format!("`models[{i}]` is {kind}, not a string"))
        }
        ModelsField::Other(other) => invalid(&format!("got {}", other.kind())),
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

fn wrong_type(key: &str, expected: &str, got: &str) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidValue,
        format!("Invalid type for `{key}`: expected {expected}, got {got}."),
    )
    .with_param(key.to_owned())
}

#[cfg(test)]
mod tests {
    //! The typed checks against the checks they replaced (over a `serde_json::Value`, kept in
    //! `super::super::reference`): the same verdict, code, param and message on random
    //! requests.

    use serde_json::{json, Value};

    use super::super::reference;
    use crate::request::{CharEstimator, Endpoint, RequestView};
    use crate::validate::ValidateRequestLayer;

    fn value(rng: &mut fastrand::Rng, depth: u32) -> Value {
        const WORDS: [&str; 9] = [
            "gpt-4o",
            "",
            "user",
            "assistant",
            "tool",
            "bot",
            "system",
            "c1",
            "tiny",
        ];
        match rng.u32(0..if depth == 0 { 7 } else { 9 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.bool()),
            2 => json!(rng.i64(-3..5)),
            3 => json!(rng.f64() * 6.0 - 3.0),
            4 => json!(u64::MAX - rng.u64(0..2)),
            5 | 6 => json!(WORDS[rng.usize(..WORDS.len())]),
            7 => Value::Array(
                (0..rng.usize(0..3))
                    .map(|_| value(rng, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.usize(0..3))
                    .map(|_| ("content".to_owned(), value(rng, depth - 1)))
                    .collect(),
            ),
        }
    }

    fn message(rng: &mut fastrand::Rng) -> Value {
        const KEYS: [&str; 7] = [
            "role",
            "content",
            "tool_call_id",
            "tool_calls",
            "function_call",
            "audio",
            "name",
        ];
        if rng.u8(0..10) == 0 {
            return value(rng, 1);
        }
        let mut m = serde_json::Map::new();
        for key in KEYS {
            if rng.u8(0..3) > 0 {
                m.insert(key.to_owned(), value(rng, 2));
            }
        }
        if rng.bool() {
            let role = ["user", "assistant", "tool", "system", "developer"][rng.usize(..5)];
            m.insert("role".to_owned(), json!(role));
        }
        Value::Object(m)
    }

    fn request(rng: &mut fastrand::Rng) -> Value {
        const KEYS: [&str; 17] = [
            "model",
            "prompt",
            "input",
            "previous_response_id",
            "conversation",
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "n",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
            "stream",
            "models",
            "system",
            "x",
        ];
        let mut obj = serde_json::Map::new();
        for _ in 0..rng.usize(0..6) {
            let key = KEYS[rng.usize(..KEYS.len())];
            obj.insert(key.to_owned(), value(rng, 2));
        }
        if rng.u8(0..4) > 0 {
            obj.insert(
                "model".to_owned(),
                json!(["gpt-4o", "tiny", "other"][rng.usize(..3)]),
            );
        }
        match rng.u8(0..4) {
            0 => {}
            1 => {
                obj.insert("messages".to_owned(), value(rng, 2));
            }
            _ => {
                let messages = (0..rng.usize(0..4)).map(|_| message(rng)).collect();
                obj.insert("messages".to_owned(), Value::Array(messages));
            }
        }
        Value::Object(obj)
    }

    #[test]
    fn the_typed_checks_answer_as_the_value_checks_did() {
        let layers = [
            ValidateRequestLayer::new(),
            ValidateRequestLayer::builder()
                .allowed_models(["gpt-4o", "tiny"])
                .context_window("tiny", 12)
                .build()
                .unwrap(),
            ValidateRequestLayer::builder()
                .check_params(false)
                .check_messages(false)
                .allowed_models(["gpt-4o"])
                .build()
                .unwrap(),
            ValidateRequestLayer::builder()
                .check_required_fields(false)
                .check_endpoint(false)
                .build()
                .unwrap(),
        ];
        let endpoints = [
            ("/v1/chat/completions", Endpoint::ChatCompletions),
            ("/v1/completions", Endpoint::Completions),
            ("/v1/embeddings", Endpoint::Embeddings),
            ("/v1/responses", Endpoint::Responses),
            (
                "/openai/deployments/tiny/chat/completions",
                Endpoint::ChatCompletions,
            ),
        ];
        let mut rng = fastrand::Rng::with_seed(99);
        let mut refused = 0;
        for i in 0..20_000 {
            let doc = request(&mut rng);
            let bytes = bytes::Bytes::from(serde_json::to_vec(&doc).unwrap());
            // The old checks read the body as a `Value` parse gave it.
            let doc: Value = serde_json::from_slice(&bytes).unwrap();
            let (path, endpoint) = endpoints[rng.usize(..endpoints.len())];
            let view = RequestView::parse_bytes(endpoint, bytes, &CharEstimator)
                .unwrap()
                .with_path(path);
            for layer in &layers {
                let typed = layer.check(&view);
                let old = reference::check(&layer.shared, &view, &doc);
                let show = |r: &Result<(), crate::ApiError>| {
                    r.as_ref().err().map(|e| {
                        (
                            e.code(),
                            e.param().map(str::to_owned),
                            e.message().to_owned(),
                        )
                    })
                };
                assert_eq!(show(&typed), show(&old), "case {i}: {path} {doc}");
                refused += usize::from(typed.is_err());
            }
        }
        // The random requests reach both verdicts.
        assert!(refused > 1_000 && refused < 80_000 - 1_000, "{refused}");
    }
}
