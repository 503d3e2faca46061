//! Assembly of Switchyard roles into runnable processes. The `switchyard` binary
//! parses flags and calls into here; integration tests start the same clusters.

pub mod dev;
pub mod telemetry;
