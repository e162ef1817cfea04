//! The proxy-wasm glue: callbacks gather inputs, call the pure core, and apply its answer.
//! Nothing here may panic: a panic traps the worker's VM and fails all of its traffic.

mod host;
mod stats;

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::config::{self, Config};
use crate::rng::SplitMix64;
use crate::tracker::{Install, PoolTracker, Ticket};
use host::HostStore;
use stats::{FailOpen, Stats};

proxy_wasm::main! {{
    // Envoy's own `wasm` log level filters further; request-path code logs nothing below warn.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::<Root>::default() });
}}

#[derive(Default)]
struct Root {
    filter: Option<Rc<Filter>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        match Filter::configure() {
            Ok(filter) => {
                self.filter = Some(Rc::new(filter));
                true
            }
            Err(message) => {
                log::error!("model-lb: rejecting plugin configuration: {message}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(filter) = &self.filter {
            filter.housekeeping();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            filter: self.filter.clone(),
            ticket: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    config: Config,
    tracker: RefCell<PoolTracker>,
    rng: RefCell<SplitMix64>,
    stats: RefCell<Stats>,
}

impl Filter {
    fn configure() -> Result<Self, String> {
        let bytes = host::plugin_configuration()
            .map_err(|status| format!("cannot read the plugin configuration (status {status})"))?;
        let config = config::parse(bytes.as_deref()).map_err(|e| e.to_string())?;
        let now_ms = host::now_ms().unwrap_or(0);
        let seed = vm_seed(now_ms);
        let mut tracker = PoolTracker::new(&config.cluster, config.endpoints.clone(), seed, now_ms);
        let install = tracker.install(&HostStore).map_err(|e| {
            format!(
                "cannot set up the shared outstanding-request table \"{}\": {e}",
                tracker.table_key()
            )
        })?;
        let interval = u32::try_from(config.housekeeping_interval_ms).unwrap_or(u32::MAX);
        host::set_tick_period_ms(interval)
            .map_err(|status| format!("cannot set the housekeeping tick (status {status})"))?;
        let stats = Stats::new(&config, tracker.membership());
        if install != Install::Adopted {
            log::info!(
                "model-lb: cluster \"{}\": {} endpoints, strategy {}, header \"{}\", {} fallbacks ({})",
                config.cluster,
                config.endpoints.len(),
                config.strategy.name(),
                config.endpoint_header,
                config.fallback_endpoints,
                match install {
                    Install::Created => "new shared table",
                    Install::Replaced => "endpoint list changed; counts of kept endpoints carried over",
                    Install::Adopted => "shared table adopted",
                }
            );
        }
        Ok(Self {
            config,
            tracker: RefCell::new(tracker),
            rng: RefCell::new(SplitMix64::new(seed ^ 0x5DEE_CE66_D1CE_4E5B)),
            stats: RefCell::new(stats),
        })
    }

    /// Chooses the endpoints and writes them into the routing header. Whatever happens, the
    /// header a client sent does not survive: it is overwritten or removed.
    fn route(&self) -> Option<Ticket> {
        let (Ok(mut tracker), Ok(mut rng), Ok(mut stats)) = (
            self.tracker.try_borrow_mut(),
            self.rng.try_borrow_mut(),
            self.stats.try_borrow_mut(),
        ) else {
            self.fail_open(None, FailOpen::Reentered);
            return None;
        };
        let routed = tracker.route(
            &HostStore,
            self.config.strategy,
            self.config.fallback_endpoints,
            &mut *rng,
            |_| true,
        );
        match routed {
            Ok(routed) => {
                let value = routed.membership.header_value(&routed.selection);
                if host::set_request_header(&self.config.endpoint_header, &value).is_err() {
                    // A request we could not steer must not count against the endpoint.
                    tracker.release(&HostStore, routed.ticket);
                    self.fail_open(Some(&mut stats), FailOpen::HeaderWrite);
                    return None;
                }
                stats.routed(&routed);
                Some(routed.ticket)
            }
            Err(e) => {
                self.fail_open(Some(&mut stats), FailOpen::from(&e));
                None
            }
        }
    }

    fn fail_open(&self, stats: Option<&mut Stats>, reason: FailOpen) {
        let _ = host::remove_request_header(&self.config.endpoint_header);
        if let Some(stats) = stats {
            stats.fail_open(reason);
        }
    }

    fn release(&self, ticket: Ticket) {
        match self.tracker.try_borrow_mut() {
            Ok(mut tracker) => {
                tracker.release(&HostStore, ticket);
            }
            // Unreachable in a single-threaded VM; were it not, leaking the count would be
            // worse than anything else, so say so loudly.
            Err(_) => log::error!(
                "model-lb: could not release a request on {}: tracker busy",
                ticket.endpoint_address()
            ),
        }
    }

    fn housekeeping(&self) {
        let Some(now_ms) = host::now_ms() else {
            return;
        };
        let (Ok(mut tracker), Ok(mut stats)) =
            (self.tracker.try_borrow_mut(), self.stats.try_borrow_mut())
        else {
            return;
        };
        let result = tracker.housekeeping(&HostStore, now_ms, self.config.vm_lease_ttl_ms);
        let events = tracker.take_events();
        match result {
            Ok(report) => {
                if report.reaped.slots > 0 {
                    log::warn!(
                        "model-lb: cluster \"{}\": reclaimed {} in-flight requests from {} worker \
                         VMs that stopped heartbeating for {} ms",
                        self.config.cluster,
                        report.reaped.requests,
                        report.reaped.slots,
                        self.config.vm_lease_ttl_ms
                    );
                }
                if let Some(loads) = report.loads {
                    stats.publish_loads(tracker.membership(), &loads);
                }
            }
            Err(e) => log::warn!(
                "model-lb: cluster \"{}\": housekeeping failed, will retry next tick: {e}",
                self.config.cluster
            ),
        }
        stats.flush(&events, &self.config.cluster, tracker.pending_releases());
    }
}

struct Request {
    filter: Option<Rc<Filter>>,
    ticket: Option<Ticket>,
}

impl Request {
    /// Ends the request's count exactly once, from whichever of `on_log` or drop comes first.
    fn finish(&mut self) {
        if let (Some(filter), Some(ticket)) = (&self.filter, self.ticket.take()) {
            filter.release(ticket);
        }
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(filter) = &self.filter {
            if self.ticket.is_none() {
                self.ticket = filter.route();
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        self.finish();
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Each VM needs its own random stream (tie-breaks, slot owner tokens). `RandomState` draws its
/// keys from WASI `random_get`, which Envoy provides; the clock is mixed in for good measure.
fn vm_seed(now_ms: u64) -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(now_ms);
    hasher.finish()
}
