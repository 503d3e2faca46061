//! Identifier newtypes, one per id family, so that an account id can never be
//! passed where a provider id is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_owned())
            }
        }
    };
}

string_id!(
    /// A consumer or provider-owner account.
    AccountId
);
string_id!(
    /// A coordinator node, stable across restarts (for example `coordinator-0`).
    NodeId
);
string_id!(
    /// A model as named in the catalog and in consumer requests.
    ModelId
);
string_id!(
    /// One dispatch attempt to a provider. A retry gets a new one, as the provider
    /// protocol requires.
    RequestId
);
string_id!(
    /// One consumer request as seen by the router. Billing is idempotent by it, and
    /// it stays the same across the dispatch attempts it causes.
    ConsumerRequestId
);

impl RequestId {
    /// Creates a fresh UUIDv4 request id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
}

impl ConsumerRequestId {
    /// Creates a fresh UUIDv4 consumer request id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
}

/// One provider connection on a node. A reconnect gets a new id, because the
/// provider protocol carries no connection identity of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProviderId(uuid::Uuid);

impl ProviderId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
