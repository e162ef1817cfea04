//! The glue, driven natively as Envoy drives it: callbacks in Envoy's order, against the
//! simulated host in `fake.rs`. The end-to-end tests prove the same paths in a real Envoy; these
//! pin down what a real Envoy makes hard to observe (every header write, every metric definition,
//! exact counts at each step) and run in milliseconds.

use std::rc::Rc;

use super::fake::{logs, FakeEnvoy, FakeVm};
use super::hold;
use super::host::HostRef;
use super::{Request, Root, Stream};

const HEADER: &str = "x-gateway-destination-endpoint";
const ENDPOINTS: [&str; 3] = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"];

/// One worker VM of a simulated Envoy, with its root context configured.
struct Vm {
    host: Rc<FakeVm>,
    root: Root,
    next_context: u32,
}

impl Vm {
    fn start(envoy: &Rc<FakeEnvoy>, configuration: &str) -> Self {
        Self::try_start(envoy, configuration).expect("configuration accepted")
    }

    fn try_start(envoy: &Rc<FakeEnvoy>, configuration: &str) -> Option<Self> {
        let host = FakeVm::new(envoy, configuration);
        let as_host: HostRef = host.clone();
        let mut root = Root::new(as_host);
        root.on_configure().then_some(Self {
            host,
            root,
            next_context: 100,
        })
    }

    fn stream(&mut self, headers: &[(&str, &str)]) -> (u32, Request) {
        let id = self.next_context;
        self.next_context += 1;
        self.host.open(id, headers);
        match self.root.create_stream(id) {
            Stream::Router(request) => (id, request),
            Stream::Hold(_) => panic!("a routing filter's root made a hold context"),
        }
    }

    /// A request without a body, routed; its id and the routing header Envoy would see.
    fn route(&mut self, headers: &[(&str, &str)]) -> (Request, Option<String>) {
        let (id, mut request) = self.stream(headers);
        request.on_request_headers(true);
        (request, self.host.request_header_of(id, HEADER))
    }

    /// Runs the VM's tick as Envoy would after `ms`.
    fn tick_after(&mut self, ms: u64) {
        self.host.envoy.advance(ms);
        self.root.on_tick();
    }

    /// Delivers the answer to callout `token`, as Envoy does on the root context.
    fn answer(&mut self, token: u32, status: Option<u16>, body: &str) {
        *self.host.answer.borrow_mut() = (status, body.as_bytes().to_vec());
        self.root.on_http_call_response(token, body.len());
    }

    /// Answers the latest admin poll with the `models` cluster's hosts: (ip, health_status JSON).
    fn answer_admin_poll(&mut self, hosts: &[(&str, &str)]) {
        let token = self.last_callout().token;
        let statuses: Vec<String> = hosts
            .iter()
            .map(|(ip, health)| {
                format!(
                    r#"{{"address":{{"socket_address":{{"address":"{ip}","port_value":80}}}},"health_status":{health}}}"#
                )
            })
            .collect();
        let body = format!(
            r#"{{"cluster_statuses":[{{"name":"other","host_statuses":[]}},{{"name":"models","host_statuses":[{}]}}]}}"#,
            statuses.join(",")
        );
        self.answer(token, Some(200), &body);
    }

    fn last_callout(&self) -> super::fake::Callout {
        self.host
            .callouts
            .borrow()
            .last()
            .cloned()
            .expect("a callout")
    }

    /// Ticks and checks that nothing is counted and nothing was ever clamped.
    fn assert_nothing_in_flight(&mut self) {
        self.tick_after(1_000);
        assert_eq!(metric(&self.host.envoy, "in_flight"), 0);
        assert_eq!(metric(&self.host.envoy, "counter_corrections"), 0);
    }

    /// Ends a request as Envoy does: `on_log` with the upstream's answer, then the context goes.
    fn finish(&self, mut request: Request, upstream: &str, code: i64, details: &str) {
        self.host.enter(request.context_id);
        self.host.with_stream(request.context_id, |s| {
            s.properties
                .insert("upstream.address".into(), upstream.as_bytes().to_vec());
            s.properties
                .insert("response.code".into(), code.to_le_bytes().to_vec());
            s.properties
                .insert("response.code_details".into(), details.as_bytes().to_vec());
        });
        request.on_log();
        drop(request);
    }
}

const HEALTHY: &str = r#"{"eds_health_status":"HEALTHY"}"#;

fn lor(extra: &str) -> String {
    format!(
        r#"{{"pool": "p", "endpoints": ["{}", "{}", "{}"]{extra}}}"#,
        ENDPOINTS[0], ENDPOINTS[1], ENDPOINTS[2]
    )
}

fn first(header: &Option<String>) -> String {
    header
        .as_deref()
        .and_then(|h| h.split(',').next())
        .expect("a routing header")
        .to_owned()
}

fn metric(envoy: &FakeEnvoy, suffix: &str) -> i64 {
    envoy
        .metric(&format!("model_lb.p.{suffix}"))
        .unwrap_or_else(|| panic!("no stat model_lb.p.{suffix}"))
}

#[test]
fn a_bad_configuration_is_refused_with_the_field_and_the_fix_in_the_log() {
    logs::start();
    let envoy = FakeEnvoy::new();
    let refused = Vm::try_start(
        &envoy,
        r#"{"pool": "p", "endpoints": ["10.0.0.1:8000"], "fallback_endpoints": "two"}"#,
    );
    assert!(refused.is_none());
    let errors = logs::at(log::Level::Error);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("rejecting plugin configuration")
            && errors[0].contains("fallback_endpoints"),
        "{errors:?}"
    );
    // Nothing was set up for a refused configuration: no table, no tick.
    assert!(envoy.metric_names().is_empty());
}

#[test]
fn a_client_copy_of_the_routing_header_is_replaced_by_the_filters_choice() {
    let envoy = FakeEnvoy::new();
    let mut vm = Vm::start(&envoy, &lor(""));
    let (_held, header) = vm.route(&[
        (HEADER, "6.6.6.6:1"),
        ("X-Gateway-Destination-Endpoint", "6.6.6.6:2"),
    ]);
    let header = header.expect("the filter's header");
    assert!(!header.contains("6.6.6.6"), "{header}");
    // The first choice and two fallbacks, all of them pool members.
    let listed: Vec<&str> = header.split(',').collect();
    assert_eq!(listed.len(), 3, "{header}");
    assert!(listed.iter().all(|a| ENDPOINTS.contains(a)), "{header}");
}

#[test]
fn a_header_that_cannot_be_written_fails_open_without_holding_a_count() {
    let envoy = FakeEnvoy::new();
    let mut vm = Vm::start(&envoy, &lor(""));
    vm.tick_after(0);
    vm.host.failing_header_writes.set(Some(2));
    let (request, header) = vm.route(&[(HEADER, "6.6.6.6:1")]);
    assert_eq!(
        header, None,
        "the client's copy must go even when failing open"
    );
    vm.assert_nothing_in_flight();
    assert_eq!(metric(&envoy, "fail_open.header_write"), 1);
    drop(request);
    vm.assert_nothing_in_flight();
}

#[test]
fn every_routed_request_is_released_exactly_once_whichever_callback_ends_it() {
    let envoy = FakeEnvoy::new();
    let mut vm = Vm::start(&envoy, &lor(""));
    let mut requests: Vec<(Request, String)> = (0..9)
        .map(|_| {
            let (request, header) = vm.route(&[]);
            (request, first(&header))
        })
        .collect();
    vm.tick_after(1_000);
    assert_eq!(metric(&envoy, "in_flight"), 9);
    // LOR over three idle endpoints: three each.
    for endpoint in ENDPOINTS {
        assert_eq!(metric(&envoy, &format!("endpoint.{endpoint}.in_flight")), 3);
    }
    // Three end normally (on_log, then the context goes), three are dropped without on_log
    // (Envoy tore the VM's context down), and on_log twice must not count twice.
    for (request, upstream) in requests.drain(..3) {
        vm.finish(request, &upstream, 200, "via_upstream");
    }
    for (request, _) in requests.drain(..3) {
        drop(request);
    }
    let (mut twice, upstream) = requests.remove(0);
    vm.host.enter(twice.context_id);
    twice.on_log();
    twice.on_log();
    vm.tick_after(1_000);
    assert_eq!(metric(&envoy, "in_flight"), 2, "{upstream}");
    drop(twice);
    drop(requests);
    vm.assert_nothing_in_flight();
    assert_eq!(metric(&envoy, "decisions.least_outstanding_requests"), 9);
}

#[test]
fn a_second_vm_sees_the_requests_the_first_holds() {
    let envoy = FakeEnvoy::new();
    let mut a = Vm::start(&envoy, &lor(""));
    let mut b = Vm::start(&envoy, &lor(""));
    let (_one, first_a) = a.route(&[]);
    let (_two, second_a) = a.route(&[]);
    let (_three, from_b) = b.route(&[]);
    let taken = [first(&first_a), first(&second_a)];
    assert_ne!(taken[0], taken[1]);
    let idle = first(&from_b);
    assert!(
        !taken.contains(&idle),
        "{idle} was already busy with {taken:?}"
    );
}

#[test]
fn requests_define_no_metric_and_ticks_define_each_once() {
    let envoy = FakeEnvoy::new();
    let mut vm = Vm::start(&envoy, &lor(""));
    vm.tick_after(0);
    let defined = envoy.define_calls.get();
    assert!(
        defined > 20,
        "configure and the first tick define the stats: {defined}"
    );
    for _ in 0..200 {
        let (request, header) = vm.route(&[]);
        vm.finish(request, &first(&header), 200, "via_upstream");
    }
    assert_eq!(
        envoy.define_calls.get(),
        defined,
        "the request path defined a metric"
    );
    vm.tick_after(1_000);
    vm.tick_after(1_000);
    assert_eq!(
        envoy.define_calls.get(),
        defined,
        "a tick defined a known metric again"
    );
    assert_eq!(metric(&envoy, "decisions.least_outstanding_requests"), 200);
}

#[test]
fn failures_the_client_caused_are_excused_and_the_servers_own_eject() {
    logs::start();
    let envoy = FakeEnvoy::new();
    let mut vm = Vm::start(&envoy, &lor(r#", "max_ejection_percent": 50"#));
    vm.tick_after(0);
    // An upload the server refused by closing mid-body: Envoy's 503 is the client's doing.
    for _ in 0..12 {
        let (id, mut request) = vm.stream(&[]);
        request.on_request_headers(false);
        let upstream = first(&vm.host.request_header_of(id, HEADER));
        request.on_request_body(64 << 10, false);
        vm.finish(
            request,
            &upstream,
            503,
            "upstream_reset_before_response_started{connection_termination}",
        );
    }
    vm.tick_after(1_000);
    assert_eq!(metric(&envoy, "excused_failures"), 12);
    assert_eq!(metric(&envoy, "ejections"), 0);
    assert_eq!(metric(&envoy, "eligible_endpoints"), 3);
    // The same reset on a complete, ordinary request is the server's failure.
    for _ in 0..12 {
        let (request, header) = vm.route(&[]);
        vm.finish(
            request,
            &first(&header),
            503,
            "upstream_reset_before_response_started{connection_termination}",
        );
    }
    vm.tick_after(1_000);
    assert_eq!(metric(&envoy, "excused_failures"), 12);
    assert_eq!(
        metric(&envoy, "ejections"),
        1,
        "50 % of three endpoints: one"
    );
    assert_eq!(metric(&envoy, "eligible_endpoints"), 2);
    let warnings = logs::at(log::Level::Warn);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("ejecting") && w.contains("consecutive failures")),
        "{warnings:?}"
    );
}

#[test]
fn a_host_the_filter_did_not_list_is_counted_and_warned_once_per_tick() {
    logs::start();
    let envoy = FakeEnvoy::new();
    let mut vm = Vm::start(&envoy, &lor(""));
    vm.tick_after(0);
    for _ in 0..5 {
        let (request, _) = vm.route(&[]);
        vm.finish(request, "192.168.0.9:8000", 200, "via_upstream");
    }
    // A fallback the filter listed is honoured, whatever its position.
    let (request, header) = vm.route(&[]);
    let fallback = header
        .as_deref()
        .and_then(|h| h.split(',').nth(1))
        .expect("fallback")
        .to_owned();
    vm.finish(request, &fallback, 200, "via_upstream");
    vm.tick_after(1_000);
    assert_eq!(metric(&envoy, "unhonoured_decisions"), 5);
    let warnings: Vec<String> = logs::at(log::Level::Warn)
        .into_iter()
        .filter(|w| w.contains("did not list"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("5 requests"), "{warnings:?}");
}

const PREFIX: &str = r#"{"pool": "p", "endpoints": ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"],
    "routing_strategy": "PREFIX_AWARE", "prefix_aware": {"prefix_length": 1024, "concurrency_threshold": 2}}"#;

/// One VM with both filters: the routing filter and the hold filter after it.
struct PrefixVm {
    router: Vm,
    hold: Root,
}

impl PrefixVm {
    fn start(envoy: &Rc<FakeEnvoy>) -> Self {
        let router = Vm::start(envoy, PREFIX);
        *router.host.configuration.borrow_mut() = Some(br#"{"role": "hold"}"#.to_vec());
        let as_host: HostRef = router.host.clone();
        let mut hold = Root::new(as_host);
        assert!(hold.on_configure());
        Self { router, hold }
    }

    /// A chat request whose body arrives in two chunks; returns the header the router sees and
    /// whether the held request was let go.
    fn chat(
        &mut self,
        system: &str,
        user: &str,
        client_headers: &[(&str, &str)],
    ) -> (Request, Option<String>, bool) {
        let body = format!(
            r#"{{"stream": true, "messages": [{{"role": "system", "content": "{system}"}}, {{"role": "user", "content": "{user}"}}], "model": "m"}}"#
        );
        let (id, mut request) = self.router.stream(client_headers);
        request.on_request_headers(false);
        assert_eq!(
            self.router.host.request_header_of(id, HEADER),
            None,
            "stripped at once"
        );
        // The hold filter's context on the same stream.
        let hold_id = id + 10_000;
        self.router.host.alias(hold_id, id);
        self.router.host.enter(hold_id);
        let Stream::Hold(mut holder) = self.hold.create_stream(hold_id) else {
            panic!("the hold root made a routing context");
        };
        assert!(holder.on_request_headers(), "the tagged request is held");
        assert_eq!(
            self.router.host.request_header_of(id, hold::HOLD_HEADER),
            None
        );
        self.router.host.enter(id);
        let (head, tail) = body.split_at(body.len() / 3);
        for (chunk, end) in [(head, false), (tail, true)] {
            self.router
                .host
                .with_stream(id, |s| s.body = chunk.as_bytes().to_vec());
            request.on_request_body(chunk.len(), end);
        }
        let header = self.router.host.request_header_of(id, HEADER);
        let resumed = self.router.host.with_stream(id, |s| s.resumed);
        drop(holder);
        (request, header, resumed)
    }
}

#[test]
fn prefix_aware_holds_the_request_until_the_body_names_its_endpoint() {
    let envoy = FakeEnvoy::new();
    let mut vm = PrefixVm::start(&envoy);
    let (first_request, header, resumed) = vm.chat(
        "You are a careful assistant.",
        "hi",
        &[(HEADER, "6.6.6.6:1")],
    );
    assert!(resumed, "the held request was let go");
    let chosen = first(&header);
    assert!(ENDPOINTS.contains(&chosen.as_str()), "{header:?}");
    // The same system prompt goes to the same endpoint, on this VM and on another one
    // (another worker or another Envoy: no state is shared for the choice)...
    let (second, header, _) = vm.chat("You are a careful assistant.", "something else", &[]);
    assert_eq!(first(&header), chosen);
    let other_envoy = FakeEnvoy::new();
    let mut other = PrefixVm::start(&other_envoy);
    let (_elsewhere, header, _) = other.chat("You are a careful assistant.", "hi", &[]);
    assert_eq!(first(&header), chosen);
    // ...until it holds concurrency_threshold (2) requests: the third spills.
    let (_third, header, _) = vm.chat("You are a careful assistant.", "a third", &[]);
    assert_ne!(first(&header), chosen);
    drop((first_request, second));
    vm.router.tick_after(1_000);
    assert_eq!(metric(&envoy, "prefix.routed"), 2);
    assert_eq!(metric(&envoy, "prefix.spilled"), 1);
}

#[test]
fn a_forged_hold_tag_is_removed_and_never_holds_a_request() {
    let envoy = FakeEnvoy::new();
    let vm = PrefixVm::start(&envoy);
    let id = 7;
    vm.router.host.open(id, &[(hold::HOLD_HEADER, "100")]);
    let Stream::Hold(mut holder) = vm.hold.create_stream(id) else {
        panic!("the hold root made a routing context");
    };
    assert!(!holder.on_request_headers());
    assert_eq!(
        vm.router.host.request_header_of(id, hold::HOLD_HEADER),
        None
    );
}

#[test]
fn the_admin_poll_makes_membership_follow_envoys_cluster() {
    logs::start();
    let envoy = FakeEnvoy::new();
    let mut vm = Vm::start(
        &envoy,
        r#"{"pool": "p", "admin_cluster": "admin", "envoy_cluster": "models", "follow_membership": true}"#,
    );
    vm.tick_after(0);
    let callout = vm.last_callout();
    assert_eq!(callout.cluster, "admin");
    assert!(callout
        .headers
        .contains(&(":path".to_owned(), "/clusters?format=json".to_owned())));
    vm.answer_admin_poll(&[("10.1.0.1", HEALTHY), ("10.1.0.2", HEALTHY)]);
    let (_a, one) = vm.route(&[]);
    let (_b, two) = vm.route(&[]);
    let mut routed = vec![first(&one), first(&two)];
    routed.sort();
    assert_eq!(routed, ["10.1.0.1:80", "10.1.0.2:80"]);
    let infos = logs::at(log::Level::Info);
    assert!(
        infos
            .iter()
            .any(|l| l.contains("added [10.1.0.1:80, 10.1.0.2:80]")),
        "{infos:?}"
    );
    // A failing admin API keeps the last known members and says so once.
    for _ in 0..3 {
        vm.tick_after(2_000);
        let token = vm.last_callout().token;
        vm.answer(token, Some(503), "");
    }
    let failures: Vec<String> = logs::at(log::Level::Warn)
        .into_iter()
        .filter(|w| w.contains("admin poll failed"))
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    let (_c, three) = vm.route(&[]);
    assert!(first(&three).starts_with("10.1.0."));
}

#[test]
fn server_load_polls_each_endpoint_through_the_pool_and_avoids_a_queue() {
    let envoy = FakeEnvoy::new();
    let mut vm = Vm::start(
        &envoy,
        &lor(r#", "server_load": {"cluster": "models", "interval_ms": 100}"#),
    );
    vm.tick_after(0);
    vm.tick_after(100);
    let callouts = vm.host.callouts.borrow().clone();
    let polled: Vec<String> = callouts
        .iter()
        .filter(|c| c.cluster == "models")
        .filter_map(|c| {
            c.headers
                .iter()
                .find(|(n, _)| n == HEADER)
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert_eq!(polled.len(), 3, "{callouts:?}");
    // The first endpoint reports a queue; the others are idle.
    for callout in callouts.iter().filter(|c| c.cluster == "models") {
        let address = &callout
            .headers
            .iter()
            .find(|(n, _)| n == HEADER)
            .expect("header")
            .1;
        let waiting = if address == ENDPOINTS[0] { 4 } else { 0 };
        let body = format!("vllm:num_requests_running 8\nvllm:num_requests_waiting {waiting}\n");
        vm.answer(callout.token, Some(200), &body);
    }
    vm.tick_after(100);
    for _ in 0..4 {
        let (_held, header) = vm.route(&[]);
        assert_ne!(
            first(&header),
            ENDPOINTS[0],
            "routed to the endpoint with a queue"
        );
    }
    vm.tick_after(1_000);
    assert_eq!(metric(&envoy, "server_load.reports"), 3);
}

#[test]
fn while_envoys_view_moves_the_admin_poll_looks_again_on_the_next_tick() {
    logs::start();
    let envoy = FakeEnvoy::new();
    let mut vm = Vm::start(
        &envoy,
        r#"{"pool": "p", "endpoints": ["10.1.0.1:80", "10.1.0.2:80"], "admin_cluster": "admin", "envoy_cluster": "models"}"#,
    );
    let polls = |vm: &Vm| vm.host.callouts.borrow().len();
    vm.tick_after(0);
    // Right after start Envoy shows every host failed until its first check (Envoy 1.40 without
    // pending_active_hc for the hosts it starts with; with it for some).
    vm.answer_admin_poll(&[
        (
            "10.1.0.1",
            r#"{"failed_active_health_check":true,"pending_active_hc":true,"eds_health_status":"HEALTHY"}"#,
        ),
        (
            "10.1.0.2",
            r#"{"failed_active_health_check":true,"eds_health_status":"HEALTHY"}"#,
        ),
    ]);
    let (_failed_open, header) = vm.route(&[]);
    assert_eq!(header, None, "no endpoint is eligible yet");
    // The next tick polls again, a whole poll interval (2 s) early...
    vm.tick_after(1_000);
    assert_eq!(polls(&vm), 2);
    vm.answer_admin_poll(&[("10.1.0.1", HEALTHY), ("10.1.0.2", HEALTHY)]);
    let (_routed, header) = vm.route(&[]);
    assert!(header.is_some());
    // ...and so does the one after a change back; a quiet answer restores the interval.
    vm.tick_after(1_000);
    assert_eq!(polls(&vm), 3);
    vm.answer_admin_poll(&[("10.1.0.1", HEALTHY), ("10.1.0.2", HEALTHY)]);
    vm.tick_after(1_000);
    assert_eq!(polls(&vm), 3);
    vm.tick_after(1_000);
    assert_eq!(polls(&vm), 4);
    // A host marked as awaiting its first check is said to be so, not reported unhealthy.
    let infos = logs::at(log::Level::Info);
    assert!(
        infos
            .iter()
            .any(|l| l.contains("waiting for Envoy's first health check of [10.1.0.1:80]")),
        "{infos:?}"
    );
    let warnings = logs::at(log::Level::Warn);
    let unhealthy: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("unhealthy"))
        .collect();
    assert_eq!(unhealthy.len(), 1, "{warnings:?}");
    assert!(unhealthy[0].contains("10.1.0.2:80"), "{warnings:?}");
}
