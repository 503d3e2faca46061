//! Types and rules shared by every Switchyard role.
//!
//! Layout: `protocol` is the provider WebSocket wire format, `seal` the NaCl box
//! sealing used on it, `ids` and `money` the identifier and amount newtypes,
//! `catalog` the model catalog with prices, `ring` the rendezvous-hashing ring that
//! maps models to nodes, `api` the consumer-facing error format, `internal` the
//! router-to-node envelope, and `ledger` the ledger trait with its in-memory
//! implementation.

pub mod api;
pub mod catalog;
pub mod cluster;
pub mod ids;
pub mod internal;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod protocol;
pub mod ring;
pub mod seal;
