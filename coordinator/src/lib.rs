//! A coordinator node: owns the provider sessions routed to it, schedules requests
//! onto them, relays and translates their answers, and settles each request in the
//! ledger.
//!
//! Layout: `session` runs a provider's WebSocket, `provider` is the shared handle
//! of one provider, `scheduler` ranks providers per model, `dispatch` runs one
//! consumer request from placement to settlement, `request` validates consumer
//! bodies, `translate` produces the OpenAI format, `http` is the internal HTTP
//! surface, and `node` holds the state they share.

pub mod config;
pub mod dispatch;
pub mod http;
pub mod membership;
pub mod node;
pub mod provider;
pub mod rehome;
pub mod request;
pub mod scheduler;
pub mod session;
pub mod translate;

pub use config::{NodeConfig, TrustLevel};
pub use node::{NodeState, serve};
