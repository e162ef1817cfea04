//! The wasm build's side of the glue: [`Host`] over proxy-wasm host calls, and the SDK's context
//! traits, each a one-line hand-over to the glue's own `Root`, `Request` and `Hold`.
//!
//! The host calls are declared here rather than taken from the SDK's `hostcalls` module because
//! those `panic!` on any status they do not expect, and a panic in a wasm VM aborts every request
//! of that worker. Each wrapper returns the raw status instead.

use std::ptr::null_mut;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use super::hold::Hold;
use super::host::{Host, MetricKind};
use super::{Request, Root, Stream};
use crate::store::{SharedStore, StoreError};

proxy_wasm::main! {{
    // Envoy's own `wasm` log level filters further; request-path code logs nothing below warn.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(RootContextOf(Root::new(Rc::new(WasmHost))))
    });
}}

struct RootContextOf(Root);

impl Context for RootContextOf {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body: usize, _: usize) {
        self.0.on_http_call_response(token, body);
    }
}

impl RootContext for RootContextOf {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        self.0.on_configure()
    }

    fn on_tick(&mut self) {
        self.0.on_tick();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(match self.0.create_stream(context_id) {
            Stream::Router(request) => Box::new(RequestContextOf(request)),
            Stream::Hold(hold) => Box::new(HoldContextOf(hold)),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct RequestContextOf(Request);

impl Context for RequestContextOf {}

impl HttpContext for RequestContextOf {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.0.on_request_headers(end_of_stream);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.0.on_request_body(body_size, end_of_stream);
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.0.on_request_trailers();
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.0.on_response_headers();
        Action::Continue
    }

    fn on_log(&mut self) {
        self.0.on_log();
    }
}

struct HoldContextOf(Hold);

impl Context for HoldContextOf {}

impl HttpContext for HoldContextOf {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.0.on_request_headers() {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

const MAP_HTTP_REQUEST_HEADERS: u32 = 0;
const MAP_HTTP_RESPONSE_HEADERS: u32 = 2;
const MAP_HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
const BUFFER_HTTP_REQUEST_BODY: u32 = 0;
const BUFFER_HTTP_CALL_RESPONSE_BODY: u32 = 4;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const EMPTY: u32 = 7;
const METRIC_COUNTER: u32 = 0;
const METRIC_GAUGE: u32 = 1;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

/// Takes ownership of a buffer the host allocated through the SDK's `proxy_on_memory_allocate`
/// (a boxed slice of exactly `size` bytes).
unsafe fn take_host_buffer(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        None
    } else {
        Some(Vec::from_raw_parts(data, size, size))
    }
}

fn status(code: u32) -> Result<(), u32> {
    if code == OK {
        Ok(())
    } else {
        Err(code)
    }
}

/// The Envoy this VM runs in. Shared data is one store for every VM with the same `vm_id`.
struct WasmHost;

impl SharedStore for WasmHost {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let mut data: *mut u8 = null_mut();
        let mut size = 0usize;
        let mut cas = 0u32;
        let code = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        match code {
            OK => Ok(unsafe { take_host_buffer(data, size) }.map(|value| (value, cas))),
            NOT_FOUND => Ok(None),
            other => Err(StoreError::Host(other)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let code = unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        };
        match code {
            OK => Ok(()),
            CAS_MISMATCH => Err(StoreError::CasMismatch),
            other => Err(StoreError::Host(other)),
        }
    }
}

impl Host for WasmHost {
    fn now_ms(&self) -> Option<u64> {
        let mut nanos = 0u64;
        status(unsafe { proxy_get_current_time_nanoseconds(&mut nanos) }).ok()?;
        Some(nanos / 1_000_000)
    }

    fn plugin_configuration(&self) -> Result<Option<Vec<u8>>, u32> {
        buffer(BUFFER_PLUGIN_CONFIGURATION, usize::MAX)
    }

    fn set_tick_period_ms(&self, period: u32) -> Result<(), u32> {
        status(unsafe { proxy_set_tick_period_milliseconds(period) })
    }

    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        header_value(MAP_HTTP_REQUEST_HEADERS, name)
    }

    fn set_request_header(&self, name: &str, value: &str) -> Result<(), u32> {
        status(unsafe {
            proxy_replace_header_map_value(
                MAP_HTTP_REQUEST_HEADERS,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        })
    }

    fn remove_request_header(&self, name: &str) -> Result<(), u32> {
        status(unsafe {
            proxy_remove_header_map_value(MAP_HTTP_REQUEST_HEADERS, name.as_ptr(), name.len())
        })
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        header_value(MAP_HTTP_RESPONSE_HEADERS, name)
    }

    fn request_body(&self, start: usize, size: usize) -> Option<Vec<u8>> {
        buffer_range(BUFFER_HTTP_REQUEST_BODY, start, size)
            .ok()
            .flatten()
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let mut serialized = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
        for (i, segment) in path.iter().enumerate() {
            if i > 0 {
                serialized.push(0);
            }
            serialized.extend_from_slice(segment.as_bytes());
        }
        let mut data: *mut u8 = null_mut();
        let mut size = 0usize;
        let code = unsafe {
            proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size)
        };
        if code != OK {
            return None;
        }
        unsafe { take_host_buffer(data, size) }
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, u32> {
        let kind = match kind {
            MetricKind::Counter => METRIC_COUNTER,
            MetricKind::Gauge => METRIC_GAUGE,
        };
        let mut id = 0u32;
        status(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
        Ok(id)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), u32> {
        status(unsafe { proxy_increment_metric(id, delta) })
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), u32> {
        status(unsafe { proxy_record_metric(id, value) })
    }

    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<u32, String> {
        // The SDK's call, because it also registers the token so that the answer reaches the
        // root context; it returns the statuses a callout can fail with rather than panicking.
        proxy_wasm::hostcalls::dispatch_http_call(cluster, headers.to_vec(), None, vec![], timeout)
            .map_err(|status| format!("{status:?}"))
    }

    fn http_call_response_status(&self) -> Option<u16> {
        let value = header_value(MAP_HTTP_CALL_RESPONSE_HEADERS, ":status")?;
        std::str::from_utf8(&value).ok()?.parse().ok()
    }

    fn http_call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        buffer(BUFFER_HTTP_CALL_RESPONSE_BODY, size).ok().flatten()
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), u32> {
        status(unsafe { proxy_set_effective_context(context_id) })
    }

    fn continue_request(&self) -> Result<(), u32> {
        const STREAM_HTTP_REQUEST: u32 = 0;
        status(unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) })
    }

    fn memory_bytes(&self) -> Option<u64> {
        Some((core::arch::wasm32::memory_size(0) as u64) * 65_536)
    }
}

fn buffer(buffer_type: u32, max_size: usize) -> Result<Option<Vec<u8>>, u32> {
    buffer_range(buffer_type, 0, max_size)
}

fn buffer_range(buffer_type: u32, start: usize, max_size: usize) -> Result<Option<Vec<u8>>, u32> {
    let mut data: *mut u8 = null_mut();
    let mut size = 0usize;
    let code =
        unsafe { proxy_get_buffer_bytes(buffer_type, start, max_size, &mut data, &mut size) };
    match code {
        OK => Ok(unsafe { take_host_buffer(data, size) }),
        NOT_FOUND | EMPTY => Ok(None),
        other => Err(other),
    }
}

fn header_value(map: u32, name: &str) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size = 0usize;
    let code =
        unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) };
    if code != OK {
        return None;
    }
    unsafe { take_host_buffer(data, size) }
}
