//! Load-testing tools for Switchyard: simulated providers that connect to a
//! coordinator over the real provider WebSocket protocol.
//!
//! Layout: `sim` is one simulated provider (connection loop, request generation,
//! failure injection and the counters tests read), `fleet` starts and stops many of
//! them at once, `command` is the entry point of the `loadtest provider` CLI
//! subcommand, and `ledger_bench` measures settlements per second.

pub mod command;
pub mod fleet;
pub mod ledger_bench;
pub mod sim;

pub use command::{
    CommandError, PROVIDER_SOCKET_PATH, ProviderCommandArgs, provider_config, provider_socket_url,
    run_provider_command,
};
pub use fleet::{Fleet, FleetSummary, provider_name};
pub use sim::{
    Behavior, SimProvider, SimProviderConfig, SimStats, count_prompt_tokens,
    simulated_completion_text, simulated_hardware,
};
