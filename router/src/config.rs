//! Settings of one router.

use std::time::Duration;

use switchyard_shared::ids::NodeId;

use crate::rate_limit::DefaultLimits;

/// Where a coordinator node takes internal traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddress {
    pub id: NodeId,
    /// Base URL of the node's internal HTTP endpoint, for example
    /// `http://127.0.0.1:9001`.
    pub base_url: String,
}

impl NodeAddress {
    /// Parses `ID=URL`, for example `coordinator-0=http://127.0.0.1:9001`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (id, url) = spec
            .split_once('=')
            .ok_or_else(|| format!("invalid node `{spec}`: expected ID=URL"))?;
        if id.is_empty() {
            return Err(format!("invalid node `{spec}`: the id is empty"));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "invalid node `{spec}`: the URL must start with http:// or https://"
            ));
        }
        Ok(Self {
            id: NodeId::new(id),
            base_url: url.trim_end_matches('/').to_owned(),
        })
    }

    /// The node's WebSocket base URL (`ws://` or `wss://`).
    pub fn ws_base_url(&self) -> String {
        match self.base_url.strip_prefix("https://") {
            Some(rest) => format!("wss://{rest}"),
            None => format!("ws://{}", self.base_url.trim_start_matches("http://")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// The static node list; models map to nodes by rendezvous hashing over it.
    pub nodes: Vec<NodeAddress>,
    /// Shared secret presented to nodes on every internal call.
    pub cluster_token: String,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// How long an API key lookup is cached.
    pub key_cache_ttl: Duration,
    /// Most API key lookups kept in the cache.
    pub key_cache_capacity: usize,
    /// Time to connect to a node and receive its response headers.
    pub node_timeout: Duration,
    /// Bearer token of the admin endpoints; they are disabled without one.
    pub admin_token: Option<String>,
    /// Redis that holds the shared rate-limit buckets; without it each router
    /// limits on its own.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key this cluster writes.
    pub redis_key_prefix: String,
    /// Limits of accounts that set none.
    pub default_limits: DefaultLimits,
    /// Routers sharing the limits; without Redis each allows this share.
    pub routers: u32,
}

impl RouterConfig {
    pub fn new(nodes: Vec<NodeAddress>, cluster_token: String) -> Self {
        Self {
            nodes,
            cluster_token,
            max_body_bytes: 10 * 1024 * 1024,
            key_cache_ttl: Duration::from_secs(30),
            key_cache_capacity: 100_000,
            // Long enough for a request that waits in a node's queue and then for a
            // non-streaming answer.
            node_timeout: Duration::from_secs(660),
            admin_token: None,
            redis_url: None,
            redis_key_prefix: "switchyard:".to_owned(),
            default_limits: DefaultLimits {
                requests_per_minute: 0,
                tokens_per_minute: 0,
            },
            routers: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_address_parses_id_and_url() {
        let node = NodeAddress::parse("coordinator-0=http://127.0.0.1:9001/").unwrap();
        assert_eq!(node.id, NodeId::from("coordinator-0"));
        assert_eq!(node.base_url, "http://127.0.0.1:9001");
        assert_eq!(node.ws_base_url(), "ws://127.0.0.1:9001");
    }

    #[test]
    fn node_address_rejects_bad_specs() {
        assert!(NodeAddress::parse("http://127.0.0.1:9001").is_err());
        assert!(NodeAddress::parse("=http://127.0.0.1:9001").is_err());
        assert!(NodeAddress::parse("a=127.0.0.1:9001").is_err());
    }
}
