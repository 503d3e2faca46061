//! Translation of provider output into the consumer's OpenAI format.
//!
//! A provider's decrypted chunk is one SSE line, `data: {...}`, holding an OpenAI
//! `chat.completion.chunk` (streaming) or a whole `chat.completion` (non-streaming),
//! or the terminator `data: [DONE]`. The node rewrites ids and the model name so the
//! consumer never sees attempt ids, strips provider-reported usage (the node sends
//! the usage it billed), and writes its own terminator only after settlement.

use serde_json::{Map, Value, json};
use switchyard_shared::protocol::Usage;

/// One decoded provider chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderLine {
    /// `data: [DONE]`.
    Done,
    Json(Value),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("provider chunk is not an SSE data line with JSON")]
pub struct InvalidLine;

/// Parses a decrypted chunk. Surrounding whitespace is ignored.
pub fn parse_line(plaintext: &str) -> Result<ProviderLine, InvalidLine> {
    let trimmed = plaintext.trim();
    let payload = trimmed
        .strip_prefix("data:")
        .map(str::trim_start)
        .ok_or(InvalidLine)?;
    if payload == "[DONE]" {
        return Ok(ProviderLine::Done);
    }
    serde_json::from_str(payload)
        .map(ProviderLine::Json)
        .map_err(|_| InvalidLine)
}

/// True when the chunk carries content: text, a tool call or reasoning. The first
/// such chunk commits a request to its provider; a role-only chunk does not.
pub fn carries_content(chunk: &Value) -> bool {
    if chunk.get("object").and_then(Value::as_str) == Some("chat.completion") {
        return true;
    }
    let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
        return false;
    };
    choices.iter().any(|choice| {
        let Some(delta) = choice.get("delta") else {
            return false;
        };
        let non_empty_text = |key: &str| {
            delta
                .get(key)
                .and_then(Value::as_str)
                .is_some_and(|text| !text.is_empty())
        };
        let has_tool_calls = delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .is_some_and(|calls| !calls.is_empty());
        non_empty_text("content")
            || non_empty_text("reasoning")
            || non_empty_text("reasoning_content")
            || has_tool_calls
    })
}

/// Identity the node gives every chunk of one consumer response.
#[derive(Debug, Clone)]
pub struct ResponseIdentity {
    /// `chatcmpl-<consumer request id>`.
    pub id: String,
    /// The model name the consumer asked for.
    pub model: String,
    /// Unix seconds when the response started.
    pub created: u64,
}

/// Rewrites a streaming chunk for the consumer. Returns `None` for a chunk that has
/// nothing left once provider usage is removed.
pub fn rewrite_chunk(mut chunk: Value, identity: &ResponseIdentity) -> Option<Value> {
    let object = chunk.as_object_mut()?;
    object.remove("usage");
    if object.get("system_fingerprint").is_some_and(Value::is_null) {
        object.remove("system_fingerprint");
    }
    let has_choices = object
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| !choices.is_empty());
    if !has_choices {
        return None;
    }

    if let Some(choices) = object.get_mut("choices").and_then(Value::as_array_mut) {
        for choice in choices {
            if let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) {
                normalize_reasoning(delta);
            }
        }
    }

    object.insert("id".into(), Value::String(identity.id.clone()));
    object.insert(
        "object".into(),
        Value::String("chat.completion.chunk".into()),
    );
    object.insert("model".into(), Value::String(identity.model.clone()));
    object.insert("created".into(), json!(identity.created));
    Some(chunk)
}

/// Renames `reasoning_content` to `reasoning`, keeping `reasoning` if both exist.
fn normalize_reasoning(fields: &mut Map<String, Value>) {
    if let Some(reasoning_content) = fields.remove("reasoning_content")
        && !fields.contains_key("reasoning")
        && !reasoning_content.is_null()
    {
        fields.insert("reasoning".into(), reasoning_content);
    }
}

/// The consumer-facing usage object: the token counts that were billed.
pub fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

/// The final usage chunk sent when `stream_options.include_usage` is true.
pub fn usage_chunk(identity: &ResponseIdentity, usage: Usage) -> Value {
    json!({
        "id": identity.id,
        "object": "chat.completion.chunk",
        "created": identity.created,
        "model": identity.model,
        "choices": [],
        "usage": usage_json(usage),
    })
}

/// Formats one SSE event.
pub fn sse_event(value: &Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("data: {value}\n\n"))
}

pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// Builds a whole `chat.completion` from the chunks of a non-streaming answer.
///
/// A provider normally sends one chunk holding the complete object; it is passed
/// through with the node's id, model and usage. Otherwise the object is rebuilt
/// from streaming deltas: text and reasoning concatenated, tool calls merged by
/// index.
pub fn assemble_completion(chunks: &[Value], identity: &ResponseIdentity, usage: Usage) -> Value {
    let whole = chunks
        .iter()
        .find(|chunk| chunk.get("object").and_then(Value::as_str) == Some("chat.completion"));
    let mut completion = match whole {
        Some(whole) => whole.clone(),
        None => rebuild_from_deltas(chunks),
    };

    if let Some(object) = completion.as_object_mut() {
        object.insert("id".into(), Value::String(identity.id.clone()));
        object.insert("object".into(), Value::String("chat.completion".into()));
        object.insert("created".into(), json!(identity.created));
        object.insert("model".into(), Value::String(identity.model.clone()));
        object.insert("usage".into(), usage_json(usage));
        if object.get("system_fingerprint").is_some_and(Value::is_null) {
            object.remove("system_fingerprint");
        }
        if let Some(choices) = object.get_mut("choices").and_then(Value::as_array_mut) {
            for choice in choices {
                if let Some(message) = choice.get_mut("message").and_then(Value::as_object_mut) {
                    normalize_reasoning(message);
                    if message.get("content").is_some_and(Value::is_null)
                        && !message.contains_key("tool_calls")
                    {
                        message.insert("content".into(), Value::String(String::new()));
                    }
                }
            }
        }
    }
    completion
}

fn rebuild_from_deltas(chunks: &[Value]) -> Value {
    let mut content = String::new();
    let mut reasoning = String::new();
    let mut tool_calls: Vec<Value> = Vec::new();
    let mut finish_reason: Option<Value> = None;

    let deltas = chunks
        .iter()
        .filter_map(|chunk| chunk.get("choices").and_then(Value::as_array))
        .flatten();
    for choice in deltas {
        if let Some(reason) = choice
            .get("finish_reason")
            .filter(|reason| !reason.is_null())
        {
            finish_reason = Some(reason.clone());
        }
        let Some(delta) = choice.get("delta") else {
            continue;
        };
        if let Some(text) = delta.get("content").and_then(Value::as_str) {
            content.push_str(text);
        }
        let reasoning_text = delta
            .get("reasoning")
            .or_else(|| delta.get("reasoning_content"))
            .and_then(Value::as_str);
        if let Some(text) = reasoning_text {
            reasoning.push_str(text);
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for call in calls {
                merge_tool_call(&mut tool_calls, call);
            }
        }
    }

    let mut message = Map::new();
    message.insert("role".into(), Value::String("assistant".into()));
    message.insert("content".into(), Value::String(content));
    if !reasoning.is_empty() {
        message.insert("reasoning".into(), Value::String(reasoning));
    }
    let finish_reason = match finish_reason {
        Some(reason) => reason,
        None if !tool_calls.is_empty() => Value::String("tool_calls".into()),
        None => Value::String("stop".into()),
    };
    if !tool_calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(tool_calls));
    }

    json!({
        "object": "chat.completion",
        "choices": [{
            "index": 0,
            "message": Value::Object(message),
            "finish_reason": finish_reason,
        }],
    })
}

/// Merges one streamed tool-call delta into the calls collected so far: the first
/// delta of an index gives id, type and name; later ones append to the arguments.
fn merge_tool_call(calls: &mut Vec<Value>, delta: &Value) {
    let index = delta.get("index").and_then(Value::as_u64).unwrap_or(0);
    let existing = calls
        .iter_mut()
        .find(|call| call.get("index").and_then(Value::as_u64) == Some(index));
    let Some(call) = existing else {
        let mut call = delta.clone();
        if let Some(object) = call.as_object_mut() {
            object
                .entry("type")
                .or_insert_with(|| Value::String("function".into()));
        }
        calls.push(call);
        return;
    };

    let more = delta
        .pointer("/function/arguments")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if more.is_empty() {
        return;
    }
    if let Some(function) = call.get_mut("function").and_then(Value::as_object_mut) {
        let arguments = function
            .entry("arguments")
            .or_insert_with(|| Value::String(String::new()));
        if let Value::String(text) = arguments {
            text.push_str(more);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> ResponseIdentity {
        ResponseIdentity {
            id: "chatcmpl-abc".into(),
            model: "org/model".into(),
            created: 1_700_000_000,
        }
    }

    fn delta(content: Value) -> Value {
        json!({"id":"x","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":content,"finish_reason":null}]})
    }

    #[test]
    fn parse_line_reads_data_and_done() {
        assert_eq!(parse_line("data: [DONE]"), Ok(ProviderLine::Done));
        assert_eq!(
            parse_line("data: {\"a\":1}\n\n"),
            Ok(ProviderLine::Json(json!({"a":1})))
        );
        assert_eq!(parse_line("{\"a\":1}"), Err(InvalidLine));
        assert_eq!(parse_line("data: not json"), Err(InvalidLine));
    }

    #[test]
    fn role_only_chunk_does_not_commit() {
        assert!(!carries_content(&delta(
            json!({"role":"assistant","content":""})
        )));
        assert!(!carries_content(&delta(json!({"role":"assistant"}))));
        assert!(carries_content(&delta(json!({"content":"Hi"}))));
        assert!(carries_content(&delta(
            json!({"reasoning_content":"think"})
        )));
        assert!(carries_content(&delta(json!({"tool_calls":[{"index":0}]}))));
        assert!(carries_content(
            &json!({"object":"chat.completion","choices":[]})
        ));
    }

    #[test]
    fn rewrite_sets_identity_and_drops_usage() {
        let mut chunk = delta(json!({"content":"Hi","reasoning_content":"r"}));
        chunk["usage"] = json!({"prompt_tokens":1});
        chunk["system_fingerprint"] = Value::Null;
        let rewritten = rewrite_chunk(chunk, &identity()).unwrap();
        assert_eq!(rewritten["id"], "chatcmpl-abc");
        assert_eq!(rewritten["model"], "org/model");
        assert!(rewritten.get("usage").is_none());
        assert!(rewritten.get("system_fingerprint").is_none());
        assert_eq!(rewritten["choices"][0]["delta"]["reasoning"], "r");
        assert!(
            rewritten["choices"][0]["delta"]
                .get("reasoning_content")
                .is_none()
        );
    }

    #[test]
    fn rewrite_drops_usage_only_chunk() {
        let chunk =
            json!({"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":1}});
        assert_eq!(rewrite_chunk(chunk, &identity()), None);
    }

    #[test]
    fn assemble_passes_whole_completion_through() {
        let whole = json!({
            "id":"provider-id","object":"chat.completion","model":"local-name",
            "choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":99,"completion_tokens":99,"total_tokens":198}
        });
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
        };
        let completion = assemble_completion(&[whole], &identity(), usage);
        assert_eq!(completion["id"], "chatcmpl-abc");
        assert_eq!(completion["model"], "org/model");
        assert_eq!(completion["choices"][0]["message"]["content"], "Hello");
        assert_eq!(completion["usage"]["total_tokens"], 5);
    }

    #[test]
    fn assemble_rebuilds_from_deltas() {
        let chunks = vec![
            delta(json!({"role":"assistant","content":""})),
            delta(json!({"content":"Hel"})),
            delta(json!({"content":"lo"})),
            delta(
                json!({"tool_calls":[{"index":0,"id":"call_1","function":{"name":"f","arguments":"{\"a\""}}]}),
            ),
            delta(json!({"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]})),
        ];
        let usage = Usage {
            prompt_tokens: 1,
            completion_tokens: 4,
        };
        let completion = assemble_completion(&chunks, &identity(), usage);
        let message = &completion["choices"][0]["message"];
        assert_eq!(message["content"], "Hello");
        assert_eq!(
            message["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(message["tool_calls"][0]["type"], "function");
        assert_eq!(completion["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(completion["usage"]["completion_tokens"], 4);
    }
}
