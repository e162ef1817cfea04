//! The host calls the filter makes, declared here rather than taken from the SDK's `hostcalls`
//! module because those `panic!` on any status they do not expect, and a panic in a wasm VM
//! aborts every request of that worker. Each wrapper returns the raw status instead.

use std::ptr::null_mut;

use crate::store::{SharedStore, StoreError};

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
pub const METRIC_COUNTER: u32 = 0;
pub const METRIC_GAUGE: u32 = 1;

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

/// Proxy-wasm shared data: one store for every VM with the same `vm_id`.
pub struct HostStore;

impl SharedStore for HostStore {
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

pub fn set_request_header(name: &str, value: &str) -> Result<(), u32> {
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

pub fn request_header(name: &str) -> Option<Vec<u8>> {
    header_value(MAP_HTTP_REQUEST_HEADERS, name)
}

/// Makes the following host calls act on the stream of `context_id` (proxy-wasm's way for one
/// context to act on another of the same VM).
pub fn set_effective_context(context_id: u32) -> Result<(), u32> {
    status(unsafe { proxy_set_effective_context(context_id) })
}

/// Resumes the request side of the effective context's stream.
pub fn continue_request() -> Result<(), u32> {
    const STREAM_HTTP_REQUEST: u32 = 0;
    status(unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) })
}

pub fn remove_request_header(name: &str) -> Result<(), u32> {
    status(unsafe {
        proxy_remove_header_map_value(MAP_HTTP_REQUEST_HEADERS, name.as_ptr(), name.len())
    })
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

pub fn plugin_configuration() -> Result<Option<Vec<u8>>, u32> {
    buffer(BUFFER_PLUGIN_CONFIGURATION, usize::MAX)
}

/// `size` bytes of the request body Envoy has buffered, from `start`.
pub fn request_body(start: usize, size: usize) -> Option<Vec<u8>> {
    buffer_range(BUFFER_HTTP_REQUEST_BODY, start, size)
        .ok()
        .flatten()
}

pub fn http_call_response_body(size: usize) -> Option<Vec<u8>> {
    buffer(BUFFER_HTTP_CALL_RESPONSE_BODY, size).ok().flatten()
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

/// The `:status` of the answer to a `dispatch_http_call`, if there was an answer at all.
pub fn http_call_response_status() -> Option<u16> {
    let value = header_value(MAP_HTTP_CALL_RESPONSE_HEADERS, ":status")?;
    std::str::from_utf8(&value).ok()?.parse().ok()
}

pub fn response_header(name: &str) -> Option<Vec<u8>> {
    header_value(MAP_HTTP_RESPONSE_HEADERS, name)
}

/// A stream property such as `upstream.address`; `path` is the dotted name's segments.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let mut serialized = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for (i, segment) in path.iter().enumerate() {
        if i > 0 {
            serialized.push(0);
        }
        serialized.extend_from_slice(segment.as_bytes());
    }
    let mut data: *mut u8 = null_mut();
    let mut size = 0usize;
    let code =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    if code != OK {
        return None;
    }
    unsafe { take_host_buffer(data, size) }
}

/// Wall-clock milliseconds since the Unix epoch, as Envoy's time source sees it. Every VM of one
/// Envoy reads the same clock, which is what lease expiry needs.
pub fn now_ms() -> Option<u64> {
    let mut nanos = 0u64;
    status(unsafe { proxy_get_current_time_nanoseconds(&mut nanos) }).ok()?;
    Some(nanos / 1_000_000)
}

pub fn set_tick_period_ms(period: u32) -> Result<(), u32> {
    status(unsafe { proxy_set_tick_period_milliseconds(period) })
}

pub fn define_metric(kind: u32, name: &str) -> Result<u32, u32> {
    let mut id = 0u32;
    status(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, delta: i64) -> Result<(), u32> {
    status(unsafe { proxy_increment_metric(id, delta) })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), u32> {
    status(unsafe { proxy_record_metric(id, value) })
}
