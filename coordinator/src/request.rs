//! Validation and normalization of a consumer's chat completion request.
//!
//! Parameters the API defines pass through to the provider unchanged. The node
//! only fixes the completion limit: `max_completion_tokens` wins over `max_tokens`,
//! and a request with neither gets the model's default, which also sizes the hold.

use serde_json::{Map, Value};
use switchyard_shared::api::{ApiError, ErrorKind};
use switchyard_shared::catalog::ModelEntry;

/// A validated chat completion request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The body sealed to the provider, with `max_tokens` set.
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Completion limit per choice.
    pub max_tokens: u64,
    /// Number of choices requested (`n`).
    pub choices: u64,
    /// The node's own estimate of prompt tokens, used when the provider reports
    /// none (a consumer that disconnects).
    pub prompt_estimate: u64,
    /// Most prompt tokens the node accepts from the provider's report: the
    /// smaller of [`PROMPT_ESTIMATE_FACTOR`] times the estimate and the byte
    /// length of the messages and tools (every token covers at least one byte).
    /// It also sizes the hold.
    pub prompt_limit: u64,
}

/// How far above the node's estimate a provider's prompt token count may be.
/// Four covers tokenizers that split text far finer than four characters per
/// token, such as byte-level tokenizers on code or unusual scripts.
pub const PROMPT_ESTIMATE_FACTOR: u64 = 4;

impl ChatRequest {
    /// Largest number of completion tokens the request may produce.
    pub fn completion_limit(&self) -> u64 {
        self.max_tokens.saturating_mul(self.choices)
    }
}

/// Parses a request body. Errors name the field at fault.
pub fn parse_chat_request(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|error| {
        ApiError::new(
            ErrorKind::InvalidJson,
            format!("request body is not valid JSON: {error}"),
        )
    })?;
    match value {
        Value::Object(body) => Ok(body),
        _ => Err(ApiError::new(
            ErrorKind::InvalidJson,
            "request body must be a JSON object",
        )),
    }
}

/// Returns the `model` field, which must be a non-empty string.
pub fn model_field(body: &Map<String, Value>) -> Result<&str, ApiError> {
    match body.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(model),
        Some(Value::String(_)) => Err(ApiError::invalid_field(
            "model",
            "`model` must not be empty",
        )),
        Some(_) => Err(ApiError::invalid_field("model", "`model` must be a string")),
        None => Err(ApiError::invalid_field(
            "model",
            "missing required field `model`",
        )),
    }
}

/// Validates a parsed body against the model's catalog entry and normalizes it.
pub fn validate_chat_request(
    mut body: Map<String, Value>,
    entry: &ModelEntry,
) -> Result<ChatRequest, ApiError> {
    let model = model_field(&body)?.to_owned();
    let messages = validate_messages(&body)?;
    let tools_bytes = body
        .get("tools")
        .map_or(0, |tools| tools.to_string().len() as u64);
    let prompt_estimate = estimate_prompt_tokens(messages) + tools_bytes.div_ceil(4);
    let prompt_bytes = body
        .get("messages")
        .map_or(0, |messages| messages.to_string().len() as u64)
        + tools_bytes;
    let prompt_limit = prompt_bytes.min(prompt_estimate.saturating_mul(PROMPT_ESTIMATE_FACTOR));

    let stream = optional_bool(&body, "stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(flag)) => *flag,
            Some(_) => {
                return Err(ApiError::invalid_field(
                    "stream_options.include_usage",
                    "`stream_options.include_usage` must be a boolean",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::invalid_field(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }
    };

    let max_tokens = match optional_positive(&body, "max_completion_tokens")? {
        Some(limit) => limit,
        None => {
            optional_positive(&body, "max_tokens")?.unwrap_or(u64::from(entry.default_max_tokens))
        }
    };
    body.insert("max_tokens".into(), Value::from(max_tokens));

    let choices = optional_positive(&body, "n")?.unwrap_or(1);
    if choices > 128 {
        return Err(ApiError::invalid_field("n", "`n` must be at most 128"));
    }

    Ok(ChatRequest {
        body,
        model,
        stream,
        include_usage,
        max_tokens,
        choices,
        prompt_estimate,
        prompt_limit,
    })
}

fn validate_messages(body: &Map<String, Value>) -> Result<&Vec<Value>, ApiError> {
    let messages = match body.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_field(
                "messages",
                "`messages` must not be empty",
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid_field(
                "messages",
                "`messages` must be an array",
            ));
        }
        None => {
            return Err(ApiError::invalid_field(
                "messages",
                "missing required field `messages`",
            ));
        }
    };

    for (index, message) in messages.iter().enumerate() {
        let Some(message) = message.as_object() else {
            return Err(ApiError::invalid_field(
                &format!("messages[{index}]"),
                format!("`messages[{index}]` must be an object"),
            ));
        };
        match message.get("role") {
            Some(Value::String(role)) if !role.is_empty() => {}
            _ => {
                return Err(ApiError::invalid_field(
                    &format!("messages[{index}].role"),
                    format!("`messages[{index}].role` must be a non-empty string"),
                ));
            }
        }
    }
    Ok(messages)
}

fn optional_bool(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(flag)) => Ok(Some(*flag)),
        Some(_) => Err(ApiError::invalid_field(
            field,
            format!("`{field}` must be a boolean"),
        )),
    }
}

fn optional_positive(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64() {
            Some(number) if number > 0 => Ok(Some(number)),
            _ => Err(ApiError::invalid_field(
                field,
                format!("`{field}` must be a positive integer"),
            )),
        },
    }
}

/// Estimates prompt tokens: a quarter of the ASCII characters (the usual rule of
/// thumb for English with BPE tokenizers), one token per other character, and
/// four tokens of framing per message.
fn estimate_prompt_tokens(messages: &[Value]) -> u64 {
    let mut ascii = 0u64;
    let mut other = 0u64;
    for message in messages {
        let text = match message.get("content") {
            Some(Value::String(text)) => std::borrow::Cow::Borrowed(text.as_str()),
            Some(content) => std::borrow::Cow::Owned(content.to_string()),
            None => continue,
        };
        for character in text.chars() {
            if character.is_ascii() {
                ascii += 1;
            } else {
                other += 1;
            }
        }
    }
    ascii.div_ceil(4) + other + 4 * messages.len() as u64
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use switchyard_shared::catalog::Catalog;

    use super::*;

    fn entry() -> ModelEntry {
        Catalog::builtin()
            .get("mlx-community/Trinity-Mini-8bit")
            .unwrap()
            .clone()
    }

    fn validate(body: Value) -> Result<ChatRequest, ApiError> {
        validate_chat_request(body.as_object().unwrap().clone(), &entry())
    }

    fn base() -> Value {
        json!({"model":"mlx-community/Trinity-Mini-8bit","messages":[{"role":"user","content":"Hello there"}]})
    }

    #[test]
    fn defaults_fill_max_tokens() {
        let request = validate(base()).unwrap();
        assert_eq!(request.max_tokens, 8192);
        assert_eq!(request.body["max_tokens"], 8192);
        assert!(!request.stream);
        assert!(!request.include_usage);
    }

    #[test]
    fn max_completion_tokens_wins() {
        let mut body = base();
        body["max_tokens"] = json!(50);
        body["max_completion_tokens"] = json!(20);
        let request = validate(body).unwrap();
        assert_eq!(request.max_tokens, 20);
        assert_eq!(request.body["max_tokens"], 20);
    }

    #[test]
    fn parameters_pass_through() {
        let mut body = base();
        body["stop"] = json!(["a", "b"]);
        body["temperature"] = json!(0.2);
        body["tools"] = json!([{"type":"function","function":{"name":"f"}}]);
        let request = validate(body).unwrap();
        assert_eq!(request.body["stop"], json!(["a", "b"]));
        assert_eq!(request.body["temperature"], json!(0.2));
        assert!(request.body.contains_key("tools"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"messages":[{"role":"user","content":"x"}]}), "model"),
            (
                json!({"model":"","messages":[{"role":"user","content":"x"}]}),
                "model",
            ),
            (json!({"model":"m"}), "messages"),
            (json!({"model":"m","messages":[]}), "messages"),
            (
                json!({"model":"m","messages":[{"content":"x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model":"m","messages":[{"role":"user"}],"stream":"yes"}),
                "stream",
            ),
            (
                json!({"model":"m","messages":[{"role":"user"}],"max_tokens":0}),
                "max_tokens",
            ),
            (
                json!({"model":"m","messages":[{"role":"user"}],"stream_options":{"include_usage":1}}),
                "stream_options.include_usage",
            ),
        ];
        for (body, field) in cases {
            let error = validate(body.clone()).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(field), "{body}");
            assert_eq!(error.kind, ErrorKind::InvalidRequest);
        }
    }

    #[test]
    fn invalid_json_is_rejected() {
        assert_eq!(
            parse_chat_request(b"{").unwrap_err().kind,
            ErrorKind::InvalidJson
        );
        assert_eq!(
            parse_chat_request(b"[1]").unwrap_err().kind,
            ErrorKind::InvalidJson
        );
    }

    #[test]
    fn prompt_limit_is_a_factor_of_estimate() {
        let request = validate(base()).unwrap();
        // "Hello there" is 11 ASCII characters: 3 tokens, plus 4 for the message.
        assert_eq!(request.prompt_estimate, 3 + 4);
        assert_eq!(request.prompt_limit, 7 * PROMPT_ESTIMATE_FACTOR);
    }

    #[test]
    fn prompt_limit_never_exceeds_bytes() {
        let request =
            validate(json!({"model":"m","messages":[{"role":"user","content":"é"}]})).unwrap();
        let bytes = json!([{"role":"user","content":"é"}]).to_string().len() as u64;
        assert!(request.prompt_limit <= bytes);
        assert_eq!(request.prompt_estimate, 1 + 4);
    }
}
