//! A fleet of simulated providers that share one coordinator URL and model list.

use futures::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::sim::{Behavior, SimProvider, SimProviderConfig};

/// Running simulated providers started together. Dropping the fleet stops them.
pub struct Fleet {
    providers: Vec<SimProvider>,
    shutdown: CancellationToken,
}

/// Totals over a fleet's providers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetSummary {
    pub providers: usize,
    /// Providers whose connection is open and registered right now.
    pub connected: usize,
    pub registrations: u64,
    pub requests_received: u64,
    pub completed: u64,
    pub errors_sent: u64,
    pub in_flight: u64,
    pub tokens_generated: u64,
    pub cancels_received: u64,
}

/// Returns the name of the fleet's provider number `index`: `{prefix}-{index}`.
pub fn provider_name(prefix: &str, index: usize) -> String {
    format!("{prefix}-{index}")
}

impl Fleet {
    /// Starts `count` providers configured like `template`, each with its own key
    /// pair and named by [`provider_name`] from the template's name. They stop when
    /// `shutdown` is cancelled. Returns once they are started, not registered: see
    /// [`Fleet::wait_registered`].
    ///
    /// # Panics
    ///
    /// Panics when called outside a Tokio runtime.
    pub fn spawn(template: &SimProviderConfig, count: usize, shutdown: &CancellationToken) -> Self {
        let shutdown = shutdown.child_token();
        let providers = (0..count)
            .map(|index| {
                let mut config = template.clone();
                config.name = provider_name(&template.name, index);
                SimProvider::spawn_with_shutdown(config, &shutdown)
            })
            .collect();

        Self {
            providers,
            shutdown,
        }
    }

    pub fn providers(&self) -> &[SimProvider] {
        &self.providers
    }

    pub fn len(&self) -> usize {
        self.providers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Sets the behavior of every provider for the requests that arrive from now on.
    pub fn set_behavior(&self, behavior: Behavior) {
        for provider in &self.providers {
            provider.set_behavior(behavior);
        }
    }

    /// Waits until every provider has registered at least once. Callers bound the
    /// wait with a timeout.
    pub async fn wait_registered(&self) {
        join_all(
            self.providers
                .iter()
                .map(|provider| provider.wait_for_registrations(1)),
        )
        .await;
    }

    pub fn summary(&self) -> FleetSummary {
        let mut summary = FleetSummary {
            providers: self.providers.len(),
            ..FleetSummary::default()
        };
        for provider in &self.providers {
            let stats = provider.stats();
            summary.connected += usize::from(stats.connected);
            summary.registrations += stats.registrations;
            summary.requests_received += stats.requests_received;
            summary.completed += stats.completed;
            summary.errors_sent += stats.errors_sent;
            summary.in_flight += stats.in_flight;
            summary.tokens_generated += stats.tokens_generated;
            summary.cancels_received += stats.cancelled_request_ids.len() as u64;
        }
        summary
    }

    /// Asks every provider to stop without waiting for them.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops every provider and waits until all have ended.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let providers = std::mem::take(&mut self.providers);
        join_all(providers.into_iter().map(SimProvider::stop)).await;
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
