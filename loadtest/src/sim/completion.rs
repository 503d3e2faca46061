//! The text a simulated provider generates, the OpenAI-shaped SSE lines that carry
//! it, and the usage and response hash it reports.
//!
//! Everything here is deterministic except the `created` timestamp inside the
//! chunks, so a test can recompute the completion text, the usage and the response
//! hash of any request from the request JSON alone.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Completion limit used when a request sets none of `max_tokens`,
/// `max_completion_tokens` or `max_output_tokens`. The provider agent's engine uses
/// the same default.
pub const DEFAULT_MAX_TOKENS: u64 = 256;

/// Prompt tokens counted per message on top of its words, standing in for the role
/// and separator tokens that a chat template adds.
pub const PROMPT_TOKENS_PER_MESSAGE: u64 = 4;

/// The plaintext of the last chunk of a streamed response.
pub const DONE_LINE: &str = "data: [DONE]";

/// Returns the text of completion token `index` (counted from 0), including its
/// trailing space.
pub fn simulated_token(index: u64) -> String {
    format!("tok{index} ")
}

/// Returns the full completion text of a response with `n_tokens` tokens.
pub fn simulated_completion_text(n_tokens: u64) -> String {
    (0..n_tokens).map(simulated_token).collect()
}

/// Counts the prompt tokens a simulated provider reports for a chat request: the
/// whitespace-separated words of every message's content, plus
/// [`PROMPT_TOKENS_PER_MESSAGE`] per message.
///
/// Content may be a string or an array of parts, whose `text` strings are counted.
/// A request without `messages` counts the words of a string `prompt`, as a legacy
/// completions request carries.
pub fn count_prompt_tokens(request: &Value) -> u64 {
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return request
            .get("prompt")
            .and_then(Value::as_str)
            .map_or(0, count_words);
    };

    messages
        .iter()
        .map(|message| PROMPT_TOKENS_PER_MESSAGE + count_content_words(message.get("content")))
        .sum()
}

fn count_content_words(content: Option<&Value>) -> u64 {
    match content {
        Some(Value::String(text)) => count_words(text),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .map(count_words)
            .sum(),
        _ => 0,
    }
}

fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Returns how many completion tokens a simulated provider generates for `request`:
/// the request's token limit (or [`DEFAULT_MAX_TOKENS`]) capped at `configured`.
pub fn completion_token_count(request: &Value, configured: u64) -> u64 {
    requested_max_tokens(request)
        .unwrap_or(DEFAULT_MAX_TOKENS)
        .min(configured)
}

/// Returns the first positive integer among the request's token-limit fields.
fn requested_max_tokens(request: &Value) -> Option<u64> {
    ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .filter_map(|field| request.get(field).and_then(Value::as_u64))
        .find(|&limit| limit > 0)
}

/// Computes the `response_hash` of `inference_complete`: lowercase hex SHA-256 of
/// `request_id + ":" + completion_tokens + ":" + response_body`, where the body is
/// every chunk plaintext except the final `data: [DONE]`, concatenated without
/// separators.
pub fn response_hash(request_id: &str, completion_tokens: u64, response_body: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(request_id.as_bytes());
    hasher.update(b":");
    hasher.update(completion_tokens.to_string().as_bytes());
    hasher.update(b":");
    hasher.update(response_body.as_bytes());
    hex::encode(hasher.finalize())
}

/// The fields of a decrypted chat request that the simulation acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChatRequest {
    /// Empty when the request names no model.
    pub model: String,
    pub stream: bool,
    /// Whether `stream_options.include_usage` requests a usage chunk.
    pub include_usage: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl ChatRequest {
    pub fn from_json(request: &Value, configured_completion_tokens: u64) -> Self {
        let include_usage = request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);

        Self {
            model: request
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            stream: request
                .get("stream")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            include_usage,
            prompt_tokens: count_prompt_tokens(request),
            completion_tokens: completion_token_count(request, configured_completion_tokens),
        }
    }
}

/// Builds the SSE lines of one response. Each method returns one chunk plaintext:
/// a `data: ` line with no trailing newline, as the provider protocol requires.
pub(crate) struct ResponseLines {
    id: String,
    created: u64,
    model: String,
}

impl ResponseLines {
    pub fn new(request_id: &str, model: &str, created: u64) -> Self {
        Self {
            id: format!("chatcmpl-{request_id}"),
            created,
            model: model.to_owned(),
        }
    }

    /// Returns the first streamed chunk: the assistant role with empty content.
    pub fn role_chunk(&self) -> String {
        self.chunk(json!({ "role": "assistant", "content": "" }), Value::Null)
    }

    pub fn token_chunk(&self, index: u64) -> String {
        self.chunk(json!({ "content": simulated_token(index) }), Value::Null)
    }

    /// Returns the last streamed chunk. `finish_reason` is always `stop`, also when
    /// the request's token limit cut the completion short.
    pub fn finish_chunk(&self) -> String {
        self.chunk(json!({}), json!("stop"))
    }

    /// Returns the chunk that `stream_options.include_usage` requests: no choices,
    /// only usage.
    pub fn usage_chunk(&self, prompt_tokens: u64, completion_tokens: u64) -> String {
        let body = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(prompt_tokens, completion_tokens),
        });
        format!("data: {body}")
    }

    /// Returns the single chunk of a non-streamed response: a whole `chat.completion`.
    pub fn completion(&self, prompt_tokens: u64, completion_tokens: u64) -> String {
        let body = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": simulated_completion_text(completion_tokens),
                },
                "finish_reason": "stop",
            }],
            "usage": usage_json(prompt_tokens, completion_tokens),
        });
        format!("data: {body}")
    }

    fn chunk(&self, delta: Value, finish_reason: Value) -> String {
        let body = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }],
        });
        format!("data: {body}")
    }
}

fn usage_json(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(line: &str) -> Value {
        let json = line
            .strip_prefix("data: ")
            .expect("line starts with `data: `");
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn completion_text_concatenates_tokens() {
        assert_eq!(simulated_completion_text(0), "");
        assert_eq!(simulated_completion_text(3), "tok0 tok1 tok2 ");
    }

    #[test]
    fn prompt_tokens_count_words_and_messages() {
        let request = json!({
            "messages": [
                { "role": "system", "content": "be brief" },
                { "role": "user", "content": "  what is   the time " },
            ],
        });
        assert_eq!(count_prompt_tokens(&request), 4 + 2 + 4 + 4);
    }

    #[test]
    fn prompt_tokens_count_text_parts() {
        let request = json!({
            "messages": [{
                "role": "user",
                "content": [
                    { "type": "text", "text": "one two" },
                    { "type": "image_url", "image_url": { "url": "x" } },
                    { "type": "text", "text": "three" },
                ],
            }],
        });
        assert_eq!(count_prompt_tokens(&request), 4 + 3);
    }

    #[test]
    fn prompt_tokens_fall_back_to_prompt() {
        assert_eq!(count_prompt_tokens(&json!({ "prompt": "a b c" })), 3);
        assert_eq!(count_prompt_tokens(&json!({})), 0);
    }

    #[test]
    fn completion_tokens_capped_by_request_limit() {
        let cases = [
            (json!({}), 16, 16),
            (json!({}), 1000, DEFAULT_MAX_TOKENS),
            (json!({ "max_tokens": 5 }), 16, 5),
            (json!({ "max_tokens": 50 }), 16, 16),
            (json!({ "max_completion_tokens": 3 }), 16, 3),
            (json!({ "max_output_tokens": 2 }), 16, 2),
            (
                json!({ "max_tokens": 0, "max_completion_tokens": 7 }),
                16,
                7,
            ),
            (json!({ "max_tokens": "9" }), 16, 16),
        ];
        for (request, configured, expected) in cases {
            assert_eq!(
                completion_token_count(&request, configured),
                expected,
                "request {request} with {configured} configured"
            );
        }
    }

    #[test]
    fn chat_request_reads_stream_options() {
        let request = json!({
            "model": "m",
            "stream": true,
            "stream_options": { "include_usage": true },
            "messages": [{ "role": "user", "content": "hi" }],
            "max_tokens": 4,
        });
        let parsed = ChatRequest::from_json(&request, 16);
        assert_eq!(
            parsed,
            ChatRequest {
                model: "m".to_owned(),
                stream: true,
                include_usage: true,
                prompt_tokens: 5,
                completion_tokens: 4,
            }
        );
    }

    #[test]
    fn response_hash_covers_every_input() {
        let hash = response_hash("req-1", 2, "data: {}");
        assert_eq!(hash.len(), 64);
        assert!(
            hash.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(hash, response_hash("req-2", 2, "data: {}"));
        assert_ne!(hash, response_hash("req-1", 3, "data: {}"));
        assert_ne!(hash, response_hash("req-1", 2, "data: {} "));
    }

    #[test]
    fn stream_lines_are_chat_completion_chunks() {
        let lines = ResponseLines::new("r1", "m", 1_700_000_000);

        let role = parse_line(&lines.role_chunk());
        assert_eq!(role["id"], "chatcmpl-r1");
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(role["model"], "m");
        assert_eq!(role["created"], 1_700_000_000);
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(role["choices"][0]["delta"]["content"], "");

        let token = parse_line(&lines.token_chunk(7));
        assert_eq!(token["choices"][0]["delta"]["content"], "tok7 ");
        assert!(token["choices"][0]["finish_reason"].is_null());

        let finish = parse_line(&lines.finish_chunk());
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");

        let usage = parse_line(&lines.usage_chunk(3, 2));
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
    }

    #[test]
    fn completion_line_carries_text_and_usage() {
        let lines = ResponseLines::new("r1", "m", 0);
        let completion = parse_line(&lines.completion(5, 3));
        assert_eq!(completion["object"], "chat.completion");
        assert_eq!(
            completion["choices"][0]["message"]["content"],
            "tok0 tok1 tok2 "
        );
        assert_eq!(completion["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            completion["usage"],
            json!({ "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8 })
        );
    }
}
