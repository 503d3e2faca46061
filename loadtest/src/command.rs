//! The `loadtest provider` command: a fleet of simulated providers that runs until
//! Ctrl-C or cancellation, logging its totals as it goes.

use std::time::Duration;

use tokio_tungstenite::tungstenite::http::Uri;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, FleetSummary};
use crate::sim::SimProviderConfig;

/// Path of the provider WebSocket endpoint, appended to a URL that has no path.
pub const PROVIDER_SOCKET_PATH: &str = "/ws/provider";

/// Time between progress log lines.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Name prefix of the command's providers.
const NAME_PREFIX: &str = "sim-provider";

/// Options of the `loadtest provider` command.
#[derive(Clone, Debug)]
pub struct ProviderCommandArgs {
    /// `ws://host:port` or `http://host:port`, or a full endpoint URL such as
    /// `ws://host:port/ws/provider`.
    pub router_url: String,
    /// Model ids every provider announces.
    pub models: Vec<String>,
    /// Number of providers.
    pub count: usize,
    /// Content chunks per second per request; 0 means as fast as possible.
    pub token_rate: f64,
    /// Seconds between heartbeats.
    pub heartbeat_secs: u64,
    /// Completion tokens per response, further capped by each request's limit.
    pub completion_tokens: u64,
    /// Provider token sent in every `register`. A secret: never logged.
    pub auth_token: Option<String>,
}

impl ProviderCommandArgs {
    /// Creates options for one provider with the defaults of [`SimProviderConfig::new`].
    pub fn new(router_url: impl Into<String>, models: Vec<String>) -> Self {
        Self {
            router_url: router_url.into(),
            models,
            count: 1,
            token_rate: 0.0,
            heartbeat_secs: 5,
            completion_tokens: 16,
            auth_token: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("invalid router URL `{url}`: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("no model given: pass at least one --model")]
    NoModels,
    #[error("provider count must be at least 1")]
    ZeroCount,
    #[error("token rate {0} is invalid: give tokens per second, at least 0")]
    InvalidTokenRate(f64),
    #[error("heartbeat interval must be at least 1 second")]
    ZeroHeartbeat,
}

/// Returns the provider WebSocket URL for `router_url`, turning `http://` into
/// `ws://` and appending [`PROVIDER_SOCKET_PATH`] when the URL has no path.
pub fn provider_socket_url(router_url: &str) -> Result<String, CommandError> {
    let invalid = |reason| CommandError::InvalidUrl {
        url: router_url.to_owned(),
        reason,
    };

    let uri: Uri = router_url.parse().map_err(|_| invalid("not a valid URL"))?;
    let scheme = match uri.scheme_str() {
        Some(scheme @ ("ws" | "http")) => scheme,
        Some("wss" | "https") => {
            return Err(invalid(
                "TLS is not supported because the WebSocket client is built \
                 without it; use ws:// or http://",
            ));
        }
        _ => return Err(invalid("the scheme must be ws:// or http://")),
    };
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("the host is missing"));
    }

    // The scheme matched case-insensitively, so strip it by length.
    let without_scheme = &router_url[scheme.len() + "://".len()..];
    let has_path = !matches!(uri.path(), "" | "/") || uri.query().is_some();
    if has_path {
        Ok(format!("ws://{without_scheme}"))
    } else {
        let authority = without_scheme.trim_end_matches('/');
        Ok(format!("ws://{authority}{PROVIDER_SOCKET_PATH}"))
    }
}

/// Builds the provider configuration the command's fleet is cloned from.
pub fn provider_config(args: &ProviderCommandArgs) -> Result<SimProviderConfig, CommandError> {
    let url = provider_socket_url(&args.router_url)?;
    if args.models.is_empty() {
        return Err(CommandError::NoModels);
    }
    if args.count == 0 {
        return Err(CommandError::ZeroCount);
    }
    if !(args.token_rate.is_finite() && args.token_rate >= 0.0) {
        return Err(CommandError::InvalidTokenRate(args.token_rate));
    }
    if args.heartbeat_secs == 0 {
        return Err(CommandError::ZeroHeartbeat);
    }

    let mut config = SimProviderConfig::new(url, args.models.clone());
    config.name = NAME_PREFIX.to_owned();
    config.auth_token = args.auth_token.clone();
    config.heartbeat_interval = Duration::from_secs(args.heartbeat_secs);
    config.token_rate = args.token_rate;
    config.completion_tokens = args.completion_tokens;
    Ok(config)
}

/// Runs `args.count` simulated providers until Ctrl-C or until `shutdown` is
/// cancelled, then stops them and returns their totals. Fails before starting
/// anything when an option is invalid.
pub async fn run_provider_command(
    args: ProviderCommandArgs,
    shutdown: CancellationToken,
) -> Result<FleetSummary, CommandError> {
    let config = provider_config(&args)?;
    tracing::info!(
        url = %config.url,
        providers = args.count,
        models = ?config.models,
        token_rate = args.token_rate,
        heartbeat_secs = args.heartbeat_secs,
        "starting simulated providers"
    );
    let fleet = Fleet::spawn(&config, args.count, &shutdown);

    wait_for_stop(&fleet, &shutdown).await;

    let summary = fleet.summary();
    fleet.stop().await;
    tracing::info!(?summary, "simulated providers stopped");
    Ok(summary)
}

/// Logs the fleet's totals every [`REPORT_INTERVAL`] until Ctrl-C or `shutdown`.
async fn wait_for_stop(fleet: &Fleet, shutdown: &CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut listening_for_ctrl_c = true;

    let mut report = tokio::time::interval(REPORT_INTERVAL);
    // The first tick completes at once, and nothing has happened yet to report.
    report.tick().await;

    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            result = &mut ctrl_c, if listening_for_ctrl_c => match result {
                Ok(()) => {
                    tracing::info!("received Ctrl-C, stopping simulated providers");
                    return;
                }
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "failed to listen for Ctrl-C; only cancellation stops the providers now"
                    );
                    listening_for_ctrl_c = false;
                }
            },
            _ = report.tick() => {
                let summary = fleet.summary();
                tracing::info!(?summary, "simulated provider totals");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_url_appends_provider_path() {
        let cases = [
            ("ws://127.0.0.1:8080", "ws://127.0.0.1:8080/ws/provider"),
            ("ws://127.0.0.1:8080/", "ws://127.0.0.1:8080/ws/provider"),
            (
                "ws://localhost:1/ws/provider",
                "ws://localhost:1/ws/provider",
            ),
            ("ws://localhost:1/custom", "ws://localhost:1/custom"),
            ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws/provider"),
            (
                "HTTP://127.0.0.1:8080/ws/provider",
                "ws://127.0.0.1:8080/ws/provider",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                provider_socket_url(input).unwrap(),
                expected,
                "input {input}"
            );
        }
    }

    #[test]
    fn socket_url_rejects_other_schemes() {
        for input in [
            "https://127.0.0.1:8080",
            "wss://127.0.0.1:8080",
            "ftp://127.0.0.1:8080",
            "127.0.0.1:8080",
            "not a url",
        ] {
            let error = provider_socket_url(input).unwrap_err();
            assert!(
                matches!(error, CommandError::InvalidUrl { .. }),
                "input {input}: {error}"
            );
        }
    }

    #[test]
    fn provider_config_validates_options() {
        let valid = ProviderCommandArgs::new("ws://127.0.0.1:9", vec!["m".to_owned()]);
        let config = provider_config(&valid).unwrap();
        assert_eq!(config.url, "ws://127.0.0.1:9/ws/provider");
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));

        let mut no_models = valid.clone();
        no_models.models.clear();
        assert!(matches!(
            provider_config(&no_models),
            Err(CommandError::NoModels)
        ));

        let mut zero_count = valid.clone();
        zero_count.count = 0;
        assert!(matches!(
            provider_config(&zero_count),
            Err(CommandError::ZeroCount)
        ));

        for rate in [-1.0, f64::NAN, f64::INFINITY] {
            let mut bad_rate = valid.clone();
            bad_rate.token_rate = rate;
            assert!(
                matches!(
                    provider_config(&bad_rate),
                    Err(CommandError::InvalidTokenRate(_))
                ),
                "rate {rate}"
            );
        }

        let mut zero_heartbeat = valid;
        zero_heartbeat.heartbeat_secs = 0;
        assert!(matches!(
            provider_config(&zero_heartbeat),
            Err(CommandError::ZeroHeartbeat)
        ));
    }
}
