//! The router-to-node envelope: internal routes and the headers that carry what the
//! router already knows about a request.
//!
//! A node rejects any internal call without the cluster token, and the router
//! strips every `x-switchyard-*` header that came from outside before adding these.

/// Prefix of every internal header; routers drop inbound headers that start with it.
pub const HEADER_PREFIX: &str = "x-switchyard-";
pub const CLUSTER_TOKEN: &str = "x-switchyard-cluster-token";
pub const REQUEST_ID: &str = "x-switchyard-request-id";
pub const ACCOUNT_ID: &str = "x-switchyard-account-id";
/// Display prefix of the API key the request came with, for usage records.
pub const KEY_PREFIX: &str = "x-switchyard-key-prefix";
pub const API_KIND: &str = "x-switchyard-api-kind";
pub const MODEL: &str = "x-switchyard-model";
/// Set by a node on a 503 sent before any byte of the answer, when it has no
/// provider for the model: the router then tries its next candidate node.
pub const RETRY_ELSEWHERE: &str = "x-switchyard-retry-elsewhere";

/// Internal route for forwarded OpenAI chat completion requests.
pub const CHAT_COMPLETIONS_PATH: &str = "/internal/v1/chat/completions";
/// Internal WebSocket route for provider sessions piped through a router.
pub const PROVIDER_SESSION_PATH: &str = "/internal/ws/provider";

/// The consumer API a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiKind {
    ChatCompletions,
}

impl ApiKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKind::ChatCompletions => "chat_completions",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "chat_completions" => Some(ApiKind::ChatCompletions),
            _ => None,
        }
    }
}
