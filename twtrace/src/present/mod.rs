//! The aggregate and the host's figures made presentable: report rows and JSON, Prometheus
//! metrics, the HTTP API's parameters, and doctor's findings.
//! Takes in an `Aggregator` and host figures; hands on text, JSON and metrics to the views.

pub mod allocator;
pub mod api;
pub mod cost;
pub mod diagnose;
pub mod metrics;
pub mod report;
