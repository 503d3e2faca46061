//! A small Prometheus metrics registry: labelled counters and histograms kept in
//! memory and rendered in the Prometheus text format at `/metrics`.
//!
//! Hot paths increment atomics; a family's label map is behind a mutex that is
//! held only to find or create a series. Gauges are computed at scrape time by
//! the role that serves `/metrics`, so they need no bookkeeping here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds, in seconds, of the latency histogram buckets: from 100 µs (the
/// cluster path's own overhead) to 10 minutes (a long streamed answer).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 120.0, 600.0,
];

type Labels = Vec<(&'static str, String)>;

/// Counters of one metric name, one per label set.
#[derive(Default)]
pub struct CounterFamily {
    series: Mutex<BTreeMap<Labels, Arc<AtomicU64>>>,
}

impl CounterFamily {
    /// Adds `value` to the counter with these labels.
    pub fn add(&self, labels: &[(&'static str, &str)], value: u64) {
        self.counter(labels).fetch_add(value, Ordering::Relaxed);
    }

    pub fn increment(&self, labels: &[(&'static str, &str)]) {
        self.add(labels, 1);
    }

    fn counter(&self, labels: &[(&'static str, &str)]) -> Arc<AtomicU64> {
        let key: Labels = labels
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned()))
            .collect();
        lock(&self.series).entry(key).or_default().clone()
    }

    /// Returns the current value of one series, zero if it was never touched.
    pub fn value(&self, labels: &[(&'static str, &str)]) -> u64 {
        let key: Labels = labels
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned()))
            .collect();
        lock(&self.series)
            .get(&key)
            .map_or(0, |counter| counter.load(Ordering::Relaxed))
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, counter) in lock(&self.series).iter() {
            let _ = writeln!(
                out,
                "{name}{} {}",
                format_labels(labels, None),
                counter.load(Ordering::Relaxed)
            );
        }
    }
}

struct HistogramSeries {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    /// Sum of observations in microseconds.
    sum_micros: AtomicU64,
}

impl Default for HistogramSeries {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

/// Latency histograms of one metric name, one per label set.
#[derive(Default)]
pub struct HistogramFamily {
    series: Mutex<BTreeMap<Labels, Arc<HistogramSeries>>>,
}

impl HistogramFamily {
    pub fn observe(&self, labels: &[(&'static str, &str)], duration: Duration) {
        let key: Labels = labels
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned()))
            .collect();
        let series = lock(&self.series).entry(key).or_default().clone();

        let seconds = duration.as_secs_f64();
        if let Some(index) = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound) {
            series.buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        series.count.fetch_add(1, Ordering::Relaxed);
        series.sum_micros.fetch_add(
            u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (labels, series) in lock(&self.series).iter() {
            // Prometheus buckets are cumulative.
            let mut cumulative = 0;
            for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&series.buckets) {
                cumulative += bucket.load(Ordering::Relaxed);
                let le = bound.to_string();
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {cumulative}",
                    format_labels(labels, Some(&le))
                );
            }
            let count = series.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{} {count}",
                format_labels(labels, Some("+Inf"))
            );
            let sum = series.sum_micros.load(Ordering::Relaxed) as f64 / 1_000_000.0;
            let _ = writeln!(out, "{name}_sum{} {sum}", format_labels(labels, None));
            let _ = writeln!(out, "{name}_count{} {count}", format_labels(labels, None));
        }
    }
}

/// Renders one gauge family whose values the caller computed just now.
pub fn render_gauge(
    out: &mut String,
    name: &str,
    help: &str,
    values: &[(Vec<(&'static str, String)>, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, value) in values {
        let _ = writeln!(out, "{name}{} {value}", format_labels(labels, None));
    }
}

/// Renders a counter family under `name`.
pub fn render_counter(out: &mut String, family: &CounterFamily, name: &str, help: &str) {
    family.render(out, name, help);
}

/// Renders a histogram family under `name`.
pub fn render_histogram(out: &mut String, family: &HistogramFamily, name: &str, help: &str) {
    family.render(out, name, help);
}

fn format_labels(labels: &[(&'static str, String)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(name, value)| format!("{name}=\"{}\"", escape(value)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Escapes a label value as the text format requires.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section inserts or reads one map entry, so a poisoned map is
    // still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_per_label_set() {
        let family = CounterFamily::default();
        family.increment(&[("route", "/v1/models"), ("status", "200")]);
        family.add(&[("route", "/v1/models"), ("status", "200")], 2);
        family.increment(&[("route", "/v1/chat/completions"), ("status", "402")]);

        let mut out = String::new();
        render_counter(&mut out, &family, "requests_total", "Requests.");
        assert!(out.contains("# TYPE requests_total counter"));
        assert!(
            out.contains("requests_total{route=\"/v1/models\",status=\"200\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("requests_total{route=\"/v1/chat/completions\",status=\"402\"} 1"),
            "{out}"
        );
        assert_eq!(
            family.value(&[("route", "/v1/models"), ("status", "200")]),
            3
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let family = HistogramFamily::default();
        family.observe(&[("route", "r")], Duration::from_micros(50));
        family.observe(&[("route", "r")], Duration::from_millis(2));
        family.observe(&[("route", "r")], Duration::from_secs(5));

        let mut out = String::new();
        render_histogram(&mut out, &family, "latency_seconds", "Latency.");
        assert!(
            out.contains("latency_seconds_bucket{route=\"r\",le=\"0.0001\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("latency_seconds_bucket{route=\"r\",le=\"0.003\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("latency_seconds_bucket{route=\"r\",le=\"10\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("latency_seconds_bucket{route=\"r\",le=\"+Inf\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("latency_seconds_count{route=\"r\"} 3"),
            "{out}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let family = CounterFamily::default();
        family.increment(&[("model", "a\"b\\c")]);
        let mut out = String::new();
        render_counter(&mut out, &family, "m", "M.");
        assert!(out.contains(r#"m{model="a\"b\\c"} 1"#), "{out}");
    }
}

/// Request counts and latencies of one HTTP server, by route and status.
#[derive(Default)]
pub struct HttpMetrics {
    pub requests: CounterFamily,
    /// Time until the response head is ready; a streamed body continues after it.
    pub latency: HistogramFamily,
}

impl HttpMetrics {
    /// Renders both families with `prefix` (for example `switchyard_router`).
    pub fn render(&self, out: &mut String, prefix: &str) {
        render_counter(
            out,
            &self.requests,
            &format!("{prefix}_http_requests_total"),
            "HTTP requests by route and status.",
        );
        render_histogram(
            out,
            &self.latency,
            &format!("{prefix}_http_request_duration_seconds"),
            "Time from request to response head, by route.",
        );
    }
}

/// Axum middleware that counts each request by matched route and status and
/// times it. Install with `axum::middleware::from_fn_with_state`.
pub async fn track_http(
    axum::extract::State(metrics): axum::extract::State<Arc<HttpMetrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let started = std::time::Instant::now();

    let response = next.run(request).await;

    let status = response.status().as_u16().to_string();
    metrics
        .requests
        .increment(&[("route", route.as_str()), ("status", status.as_str())]);
    metrics
        .latency
        .observe(&[("route", route.as_str())], started.elapsed());
    response
}
