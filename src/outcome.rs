//! What a finished request says about the endpoint the filter chose for it. Passive health
//! ejects endpoints that keep failing, so this decides whose fault a failure was: only what the
//! server itself did may count against it. Anything a client can provoke (an oversized body the
//! server refuses by closing the connection, an upload that stalls or aborts, a request Envoy
//! answers locally) is never the endpoint's failure, or any client could empty the pool.

use crate::health::Outcome;
use crate::select::Selection;

/// Default for `max_blamed_body_bytes`: larger than any chat or completion prompt of ordinary
/// size, far below the bodies servers refuse (vLLM behind uvicorn, and most HTTP servers, answer
/// 413 and close when a body is too large, and the unread rest turns the close into a reset).
pub const DEFAULT_MAX_BLAMED_BODY_BYTES: u64 = 64 * 1024;

/// What the filter saw of one request, gathered from callbacks and `on_log` properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Where the upstream host Envoy used sits in the header list: 0 is the filter's choice,
    /// k > 0 the k-th fallback; `None` when Envoy used a host the filter did not list.
    pub listed_at: Option<usize>,
    /// `response.code`, 0 when there was none.
    pub code: i64,
    /// The whole request body passed the filter (end of stream seen) before the request ended.
    pub request_complete: bool,
    pub request_body_bytes: u64,
}

/// Whose fault, and whether Envoy honoured the decision at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    /// A 5xx or reset that was not held against the endpoint, because the client or Envoy
    /// itself caused it; counted so an operator can see the rule at work.
    pub excused: bool,
}

impl Verdict {
    const SUCCESS: Self = Self {
        outcome: Outcome::Success,
        excused: false,
    };
    const FAILURE: Self = Self {
        outcome: Outcome::Failure,
        excused: false,
    };
    const NEUTRAL: Self = Self {
        outcome: Outcome::Neutral,
        excused: false,
    };
    const EXCUSED: Self = Self {
        outcome: Outcome::Neutral,
        excused: true,
    };
}

/// Where `upstream` (the `upstream.address` property) sits in the header list the filter wrote.
pub fn listed_at(selection: &Selection, endpoints: &[String], upstream: &[u8]) -> Option<usize> {
    selection.as_slice().iter().position(|&e| {
        endpoints
            .get(usize::from(e))
            .is_some_and(|address| address.as_bytes() == upstream)
    })
}

/// Judges a finished request that reached an upstream host. `details` reads
/// `response.code_details`; it is only called for a 5xx or a retried request, because a property
/// read costs a host call and most requests succeed.
pub fn judge(
    finished: &Finished,
    max_blamed_body_bytes: u64,
    details: impl FnOnce() -> Option<String>,
) -> Verdict {
    let Some(position) = finished.listed_at else {
        // Envoy's fallback policy picked: nothing learned about the filter's choice.
        return Verdict::NEUTRAL;
    };
    // A body the server may have refused by closing the connection early: resets and
    // connection errors on such a request say nothing reliable about the server.
    let refusable_body =
        !finished.request_complete || finished.request_body_bytes > max_blamed_body_bytes;
    if position > 0 {
        // Envoy moved the request to a fallback: the first attempt failed before it was sent
        // (connect-failure / reset-before-request), unless the route also retries on resets,
        // which an oversized body can provoke.
        return if refusable_body {
            Verdict::EXCUSED
        } else {
            Verdict::FAILURE
        };
    }
    match finished.code {
        1..=499 => Verdict::SUCCESS,
        500..=599 => judge_5xx(details().as_deref().unwrap_or(""), refusable_body),
        _ => Verdict::NEUTRAL,
    }
}

fn judge_5xx(details: &str, refusable_body: bool) -> Verdict {
    const RESET_BEFORE_RESPONSE: &str = "upstream_reset_before_response_started";
    if details == "via_upstream" {
        // The server answered 5xx itself.
        return Verdict::FAILURE;
    }
    if let Some(reason) = details.strip_prefix(RESET_BEFORE_RESPONSE) {
        if reason.contains("connection_failure") {
            // Refused or unreachable: no client can cause that.
            return Verdict::FAILURE;
        }
        if reason.contains("overflow") || reason.contains("local_reset") {
            // Envoy's own circuit breakers or Envoy resetting the stream itself.
            return Verdict::EXCUSED;
        }
        // Connection closed or stream reset by the server before it answered.
        return if refusable_body {
            Verdict::EXCUSED
        } else {
            Verdict::FAILURE
        };
    }
    match details {
        // The server did not answer in time. A slow upload cannot cause this once the body is
        // complete; before that, the timeout may be the client's doing.
        "upstream_response_timeout"
        | "upstream_per_try_timeout"
        | "stream_idle_timeout"
        | "upstream_per_try_idle_timeout" => {
            if refusable_body {
                Verdict::EXCUSED
            } else {
                Verdict::FAILURE
            }
        }
        // Every other 5xx was generated by Envoy or another filter, not by the server.
        _ => Verdict::EXCUSED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = DEFAULT_MAX_BLAMED_BODY_BYTES;

    fn finished(code: i64) -> Finished {
        Finished {
            listed_at: Some(0),
            code,
            request_complete: true,
            request_body_bytes: 300,
        }
    }

    fn verdict(f: Finished, details: &str) -> Verdict {
        judge(&f, LIMIT, || Some(details.to_owned()))
    }

    #[test]
    fn answers_from_the_server_count_as_they_are() {
        assert_eq!(verdict(finished(200), "via_upstream"), Verdict::SUCCESS);
        assert_eq!(verdict(finished(413), "via_upstream"), Verdict::SUCCESS);
        assert_eq!(verdict(finished(503), "via_upstream"), Verdict::FAILURE);
        assert_eq!(verdict(finished(500), "via_upstream"), Verdict::FAILURE);
    }

    #[test]
    fn details_are_read_only_for_5xx() {
        let read = std::cell::Cell::new(false);
        let details = || {
            read.set(true);
            Some("via_upstream".to_owned())
        };
        judge(&finished(200), LIMIT, details);
        assert!(!read.get());
    }

    #[test]
    fn a_refused_connection_is_the_servers_failure_whatever_the_body() {
        let mut f = finished(503);
        f.request_body_bytes = 5 << 20;
        f.request_complete = false;
        assert_eq!(
            verdict(
                f,
                "upstream_reset_before_response_started{connection_failure}"
            ),
            Verdict::FAILURE
        );
    }

    #[test]
    fn a_server_closing_on_an_oversized_or_unfinished_body_is_excused() {
        let reset = "upstream_reset_before_response_started{connection_termination}";
        // The 5 MB body of the bug report, fully forwarded before the server's close landed.
        let mut big = finished(503);
        big.request_body_bytes = 5 << 20;
        assert_eq!(verdict(big, reset), Verdict::EXCUSED);
        // Still uploading when the server gave up on it.
        let mut unfinished = finished(503);
        unfinished.request_complete = false;
        assert_eq!(verdict(unfinished, reset), Verdict::EXCUSED);
        // An ordinary request that the server dropped: the server's failure.
        assert_eq!(verdict(finished(503), reset), Verdict::FAILURE);
        let mut at_limit = finished(503);
        at_limit.request_body_bytes = LIMIT;
        assert_eq!(
            verdict(
                at_limit,
                "upstream_reset_before_response_started{remote_reset}"
            ),
            Verdict::FAILURE
        );
    }

    #[test]
    fn replies_envoy_generates_itself_are_never_the_servers_failure() {
        for details in [
            "no_healthy_upstream",
            "upstream_reset_before_response_started{overflow}",
            "upstream_reset_before_response_started{local_reset}",
            "request_overall_timeout",
            "downstream_remote_disconnect",
            "",
        ] {
            assert_eq!(
                verdict(finished(503), details),
                Verdict::EXCUSED,
                "{details}"
            );
        }
        assert_eq!(verdict(finished(0), ""), Verdict::NEUTRAL);
    }

    #[test]
    fn timeouts_count_once_the_upload_is_complete() {
        assert_eq!(
            verdict(finished(504), "upstream_response_timeout"),
            Verdict::FAILURE
        );
        let mut slow_upload = finished(504);
        slow_upload.request_complete = false;
        assert_eq!(
            verdict(slow_upload, "stream_idle_timeout"),
            Verdict::EXCUSED
        );
    }

    #[test]
    fn a_retry_onto_a_fallback_blames_the_first_choice_unless_the_body_explains_it() {
        let mut retried = finished(200);
        retried.listed_at = Some(1);
        assert_eq!(verdict(retried, "via_upstream"), Verdict::FAILURE);
        retried.request_body_bytes = LIMIT + 1;
        assert_eq!(verdict(retried, "via_upstream"), Verdict::EXCUSED);
    }

    #[test]
    fn a_host_the_filter_did_not_list_teaches_nothing() {
        let mut f = finished(503);
        f.listed_at = None;
        assert_eq!(verdict(f, "via_upstream"), Verdict::NEUTRAL);
    }

    #[test]
    fn listed_at_finds_the_upstream_in_the_header_order() {
        let endpoints: Vec<String> = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
            .map(String::from)
            .to_vec();
        let selection = Selection::from_slice(&[2, 0]);
        assert_eq!(listed_at(&selection, &endpoints, b"10.0.0.3:80"), Some(0));
        assert_eq!(listed_at(&selection, &endpoints, b"10.0.0.1:80"), Some(1));
        assert_eq!(listed_at(&selection, &endpoints, b"10.0.0.2:80"), None);
        assert_eq!(listed_at(&selection, &endpoints, b"10.9.9.9:80"), None);
    }
}
