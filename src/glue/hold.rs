//! The hold filter (`{"role": "hold"}`), for `PREFIX_AWARE`. Envoy's router picks the upstream
//! host as soon as it sees the request headers, but the prompt is in the body. proxy-wasm cannot
//! pause headers and still read the body in the same filter (a paused wasm filter gets no body
//! callbacks), so the work is split between two filters of the same VM:
//!
//! 1. `model_lb` lets the headers pass, tagged with its context id, and reads each body chunk as
//!    it streams by;
//! 2. `model_lb_hold`, right after it, holds the headers (and buffers the body, with Envoy's
//!    watermark flow control, so nothing is buffered without bound);
//! 3. once `model_lb` has the key, it writes the routing header into the held request and
//!    resumes it: the router then sees the headers with the decision in them.

use std::cell::RefCell;
use std::collections::HashMap;

use super::host::{Host, HostRef};

/// Carries the routing filter's context id to the hold filter of the same stream.
pub const HOLD_HEADER: &str = "x-model-lb-hold";

thread_local! {
    /// Routing filter's context id → the hold filter's context id holding that stream; `None`
    /// while the routing filter has tagged its request and the hold filter has not seen it yet.
    static HOLDS: RefCell<HashMap<u32, Option<u32>>> = RefCell::new(HashMap::new());
}

/// The routing filter tagged its request for the hold filter: only tags announced this way are
/// honoured, so a client that sends the tag itself cannot make the hold filter stall a request.
pub fn expect(router: u32) {
    HOLDS.with(|holds| holds.borrow_mut().insert(router, None));
}

pub struct Hold {
    host: HostRef,
    context_id: u32,
    router: Option<u32>,
}

impl Hold {
    pub fn new(host: HostRef, context_id: u32) -> Self {
        Self {
            host,
            context_id,
            router: None,
        }
    }

    /// Whether to hold the request (pause its headers) until the routing filter releases it.
    pub fn on_request_headers(&mut self) -> bool {
        let Some(router) = self
            .host
            .request_header(HOLD_HEADER)
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u32>().ok())
        else {
            return false;
        };
        let _ = self.host.remove_request_header(HOLD_HEADER);
        let expected = HOLDS.with(|holds| match holds.borrow_mut().get_mut(&router) {
            Some(slot @ None) => {
                *slot = Some(self.context_id);
                true
            }
            _ => false,
        });
        if !expected {
            return false;
        }
        self.router = Some(router);
        true
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(router) = self.router {
            HOLDS.with(|holds| {
                let mut holds = holds.borrow_mut();
                if holds.get(&router) == Some(&Some(self.context_id)) {
                    holds.remove(&router);
                }
            });
        }
    }
}

/// Runs `decide` on the held stream of routing context `router` (so its header writes land in
/// the held request), then lets that request go on. `false` when no hold filter holds it.
pub fn release(host: &dyn Host, router: u32, decide: impl FnOnce()) -> bool {
    let Some(held) = HOLDS
        .with(|holds| holds.borrow_mut().remove(&router))
        .flatten()
    else {
        return false;
    };
    if host.set_effective_context(held).is_err() {
        return false;
    }
    decide();
    let _ = host.continue_request();
    let _ = host.set_effective_context(router);
    true
}

/// Forgets a routing context's hold (the request ended before a decision).
pub fn forget(router: u32) {
    HOLDS.with(|holds| holds.borrow_mut().remove(&router));
}
