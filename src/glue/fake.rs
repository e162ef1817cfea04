//! A simulated Envoy for the glue's unit tests: one process ([`FakeEnvoy`]: shared data, the
//! clock, metrics, logs) and its worker VMs ([`FakeVm`]: streams, callouts), each VM a [`Host`].
//! It keeps proxy-wasm's semantics where the glue relies on them: metrics are process-wide and
//! defined once per name, shared data has Envoy's CAS rules, a host call acts on the effective
//! context's stream, and a header map write replaces every value of the name.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use super::host::{Host, MetricKind};
use crate::store::{MemoryStore, SharedStore, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMetric {
    pub name: String,
    pub kind: MetricKind,
    pub value: i64,
}

/// One Envoy process.
pub struct FakeEnvoy {
    pub store: MemoryStore,
    now_ms: Cell<u64>,
    metrics: RefCell<Vec<FakeMetric>>,
    /// Every `define_metric` call, including repeats of a known name.
    pub define_calls: Cell<u64>,
}

impl FakeEnvoy {
    pub fn new() -> Rc<Self> {
        Rc::new(Self {
            store: MemoryStore::new(),
            now_ms: Cell::new(1_700_000_000_000),
            metrics: RefCell::new(Vec::new()),
            define_calls: Cell::new(0),
        })
    }

    pub fn advance(&self, ms: u64) {
        self.now_ms.set(self.now_ms.get() + ms);
    }

    pub fn metric(&self, name: &str) -> Option<i64> {
        self.metrics
            .borrow()
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }

    pub fn metric_names(&self) -> Vec<String> {
        self.metrics
            .borrow()
            .iter()
            .map(|m| m.name.clone())
            .collect()
    }
}

/// What a stream carries, as the filter can see and change it.
#[derive(Default, Debug)]
pub struct FakeStream {
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    /// The body Envoy has buffered for the current callback.
    pub body: Vec<u8>,
    pub properties: HashMap<String, Vec<u8>>,
    /// `continue_request` was called on it (a held request let go).
    pub resumed: bool,
}

impl FakeStream {
    pub fn request_header(&self, name: &str) -> Option<&str> {
        self.request_headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Callout {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
}

/// One worker VM of a [`FakeEnvoy`].
pub struct FakeVm {
    pub envoy: Rc<FakeEnvoy>,
    pub configuration: RefCell<Option<Vec<u8>>>,
    pub tick_period_ms: Cell<Option<u32>>,
    streams: RefCell<HashMap<u32, FakeStream>>,
    /// Another filter's context id on the same stream → the id the stream is kept under.
    aliases: RefCell<HashMap<u32, u32>>,
    effective: Cell<u32>,
    pub callouts: RefCell<Vec<Callout>>,
    next_token: Cell<u32>,
    /// The callout answer being delivered: status (None: no answer) and body.
    pub answer: RefCell<(Option<u16>, Vec<u8>)>,
    /// Request header writes fail with this status while set.
    pub failing_header_writes: Cell<Option<u32>>,
}

impl FakeVm {
    pub fn new(envoy: &Rc<FakeEnvoy>, configuration: &str) -> Rc<Self> {
        Rc::new(Self {
            envoy: Rc::clone(envoy),
            configuration: RefCell::new(Some(configuration.as_bytes().to_vec())),
            tick_period_ms: Cell::new(None),
            streams: RefCell::new(HashMap::new()),
            aliases: RefCell::new(HashMap::new()),
            effective: Cell::new(0),
            callouts: RefCell::new(Vec::new()),
            next_token: Cell::new(1),
            answer: RefCell::new((None, Vec::new())),
            failing_header_writes: Cell::new(None),
        })
    }

    /// A new stream with these request headers, made the effective context, as Envoy does
    /// before each of a stream's callbacks.
    pub fn open(&self, context_id: u32, headers: &[(&str, &str)]) {
        let stream = FakeStream {
            request_headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            ..FakeStream::default()
        };
        self.streams.borrow_mut().insert(context_id, stream);
        self.enter(context_id);
    }

    pub fn enter(&self, context_id: u32) {
        self.effective.set(context_id);
    }

    /// `context_id` is a second filter's context on the stream of `stream_of` (the hold filter
    /// after the routing filter).
    pub fn alias(&self, context_id: u32, stream_of: u32) {
        self.aliases.borrow_mut().insert(context_id, stream_of);
    }

    fn resolve(&self, context_id: u32) -> u32 {
        self.aliases
            .borrow()
            .get(&context_id)
            .copied()
            .unwrap_or(context_id)
    }

    pub fn with_stream<T>(&self, context_id: u32, f: impl FnOnce(&mut FakeStream) -> T) -> T {
        let id = self.resolve(context_id);
        let mut streams = self.streams.borrow_mut();
        f(streams.entry(id).or_default())
    }

    pub fn request_header_of(&self, context_id: u32, name: &str) -> Option<String> {
        self.with_stream(context_id, |s| s.request_header(name).map(str::to_owned))
    }

    fn current<T>(&self, f: impl FnOnce(&mut FakeStream) -> T) -> T {
        self.with_stream(self.effective.get(), f)
    }
}

impl SharedStore for FakeVm {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.envoy.store.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.envoy.store.set(key, value, cas)
    }
}

impl Host for FakeVm {
    fn now_ms(&self) -> Option<u64> {
        Some(self.envoy.now_ms.get())
    }

    fn plugin_configuration(&self) -> Result<Option<Vec<u8>>, u32> {
        Ok(self.configuration.borrow().clone())
    }

    fn set_tick_period_ms(&self, period: u32) -> Result<(), u32> {
        self.tick_period_ms.set(Some(period));
        Ok(())
    }

    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.current(|s| s.request_header(name).map(|v| v.as_bytes().to_vec()))
    }

    fn set_request_header(&self, name: &str, value: &str) -> Result<(), u32> {
        if let Some(status) = self.failing_header_writes.get() {
            return Err(status);
        }
        self.current(|s| {
            s.request_headers
                .retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            s.request_headers.push((name.to_owned(), value.to_owned()));
        });
        Ok(())
    }

    fn remove_request_header(&self, name: &str) -> Result<(), u32> {
        self.current(|s| {
            s.request_headers
                .retain(|(n, _)| !n.eq_ignore_ascii_case(name))
        });
        Ok(())
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.current(|s| {
            s.response_headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes().to_vec())
        })
    }

    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        self.current(|s| {
            let end = start.saturating_add(size).min(s.body.len());
            (start < end).then(|| s.body[start..end].to_vec())
        })
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let name = path.join(".");
        self.current(|s| s.properties.get(&name).cloned())
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, u32> {
        let envoy = &self.envoy;
        envoy.define_calls.set(envoy.define_calls.get() + 1);
        let mut metrics = envoy.metrics.borrow_mut();
        let id = match metrics.iter().position(|m| m.name == name) {
            Some(id) => id,
            None => {
                metrics.push(FakeMetric {
                    name: name.to_owned(),
                    kind,
                    value: 0,
                });
                metrics.len() - 1
            }
        };
        u32::try_from(id).map_err(|_| 2)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), u32> {
        let mut metrics = self.envoy.metrics.borrow_mut();
        let metric = metrics.get_mut(id as usize).ok_or(1u32)?;
        metric.value += delta;
        Ok(())
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), u32> {
        let mut metrics = self.envoy.metrics.borrow_mut();
        let metric = metrics.get_mut(id as usize).ok_or(1u32)?;
        metric.value = i64::try_from(value).unwrap_or(i64::MAX);
        Ok(())
    }

    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        _timeout: Duration,
    ) -> Result<u32, String> {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        self.callouts.borrow_mut().push(Callout {
            token,
            cluster: cluster.to_owned(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        });
        Ok(token)
    }

    fn http_call_response_status(&self) -> Option<u16> {
        self.answer.borrow().0
    }

    fn http_call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        let answer = self.answer.borrow();
        Some(answer.1[..size.min(answer.1.len())].to_vec())
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), u32> {
        if !self
            .streams
            .borrow()
            .contains_key(&self.resolve(context_id))
        {
            return Err(2);
        }
        self.effective.set(context_id);
        Ok(())
    }

    fn continue_request(&self) -> Result<(), u32> {
        self.current(|s| s.resumed = true);
        Ok(())
    }

    fn memory_bytes(&self) -> Option<u64> {
        None
    }
}

/// Log lines of the current test thread, for tests that check what an operator is told.
pub mod logs {
    use std::cell::RefCell;
    use std::sync::Once;

    thread_local! {
        static LINES: RefCell<Vec<(log::Level, String)>> = const { RefCell::new(Vec::new()) };
    }

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }

        fn log(&self, record: &log::Record) {
            LINES.with(|l| {
                l.borrow_mut()
                    .push((record.level(), record.args().to_string()))
            });
        }

        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture;
    static INSTALL: Once = Once::new();

    /// Starts capturing (idempotent) and forgets what this thread logged so far.
    pub fn start() {
        INSTALL.call_once(|| {
            if log::set_logger(&CAPTURE).is_ok() {
                log::set_max_level(log::LevelFilter::Info);
            }
        });
        LINES.with(|l| l.borrow_mut().clear());
    }

    /// This thread's lines at `level` or more severe, since `start`.
    pub fn at(level: log::Level) -> Vec<String> {
        LINES.with(|l| {
            l.borrow()
                .iter()
                .filter(|(lvl, _)| *lvl <= level)
                .map(|(_, line)| line.clone())
                .collect()
        })
    }
}
