//! Everything the glue asks of Envoy, as one trait: shared data, headers, body, properties,
//! metrics, time and callouts. The wasm build implements it over proxy-wasm host calls
//! (`wasm.rs`); the native unit tests over an in-memory stream and store (`fake.rs`), so the
//! glue's own decisions (header stripping, exactly-once releases, what counts against an
//! endpoint, when a metric is defined) are tested like the rest of the core.
//!
//! Every call returns the host's status instead of panicking: a panic in a wasm VM aborts every
//! request of that worker.

use std::time::Duration;

use crate::store::SharedStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

pub trait Host: SharedStore {
    /// Wall-clock milliseconds since the Unix epoch, as Envoy's time source sees it. Every VM of
    /// one Envoy reads the same clock, which is what lease expiry needs.
    fn now_ms(&self) -> Option<u64>;
    fn plugin_configuration(&self) -> Result<Option<Vec<u8>>, u32>;
    fn set_tick_period_ms(&self, period: u32) -> Result<(), u32>;

    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// Replaces every value of `name` (adds it if absent).
    fn set_request_header(&self, name: &str, value: &str) -> Result<(), u32>;
    fn remove_request_header(&self, name: &str) -> Result<(), u32>;
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// `size` bytes of the request body Envoy has buffered, from `start`.
    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>>;
    /// A stream property such as `upstream.address`; `path` is the dotted name's segments.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, u32>;
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), u32>;
    fn record_metric(&self, id: u32, value: u64) -> Result<(), u32>;

    /// Starts a callout; its answer arrives at the root context with the returned token. The
    /// error names the host's status.
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<u32, String>;
    /// The `:status` of the callout answer being delivered, if there was an answer at all.
    fn http_call_response_status(&self) -> Option<u16>;
    fn http_call_response_body(&self, size: usize) -> Option<Vec<u8>>;

    /// Makes the following calls act on the stream of `context_id` (proxy-wasm's way for one
    /// context to act on another of the same VM).
    fn set_effective_context(&self, context_id: u32) -> Result<(), u32>;
    /// Resumes the request side of the effective context's stream.
    fn continue_request(&self) -> Result<(), u32>;

    /// The VM's linear memory, where the platform can tell.
    fn memory_bytes(&self) -> Option<u64>;
}

/// `Host` is object-safe and used as `Rc<dyn Host>`: one vtable call per host call is noise
/// beside the host call itself, and it keeps the glue's types free of a type parameter.
pub type HostRef = std::rc::Rc<dyn Host>;
