//! When the waypoint tries a request again, as Envoy's retry policy decides it: only a request
//! that is safe to repeat (idempotent, or refused before it was sent) and whose body was kept,
//! only for the route's retryable codes, and only while tries are left. Pure, tested here;
//! `server::route_request` runs the tries.

use http::StatusCode;

use super::config::Retry;

/// What to do after an endpoint answered `status` on try `n` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterAnswer {
    /// Try again (flag `URX` if the last try also fails).
    Retry,
    /// Send this answer back; `exhausted` when every try answered a retryable error.
    Answer { exhausted: bool },
}

/// The request, as far as repeating it goes.
#[derive(Clone, Copy, Debug)]
pub struct Repeatable {
    /// GET, HEAD, OPTIONS, PUT, DELETE, TRACE.
    pub idempotent: bool,
    /// Its body was kept (small, or none), so it can be sent again.
    pub replayable: bool,
}

pub fn after_answer(retry: &Retry, req: Repeatable, status: StatusCode, n: u32) -> AfterAnswer {
    let retryable = retry.codes.contains(&status.as_u16()) && req.idempotent && req.replayable;
    if retryable && n < retry.attempts {
        AfterAnswer::Retry
    } else {
        AfterAnswer::Answer {
            exhausted: retryable && n > 0,
        }
    }
}

/// Whether a try that failed without an answer (`connect_failed`: the request never left) may
/// be followed by another.
pub fn may_retry_failure(req: Repeatable, connect_failed: bool) -> bool {
    (connect_failed || req.idempotent) && req.replayable
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry() -> Retry {
        Retry {
            attempts: 2,
            codes: vec![503],
            backoff: None,
        }
    }

    const GET: Repeatable = Repeatable {
        idempotent: true,
        replayable: true,
    };
    const POST: Repeatable = Repeatable {
        idempotent: false,
        replayable: true,
    };

    #[test]
    fn retryable_codes_are_retried_while_tries_are_left() {
        let r = retry();
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(after_answer(&r, GET, unavailable, 0), AfterAnswer::Retry);
        assert_eq!(after_answer(&r, GET, unavailable, 1), AfterAnswer::Retry);
        assert_eq!(
            after_answer(&r, GET, unavailable, 2),
            AfterAnswer::Answer { exhausted: true }
        );
        assert_eq!(
            after_answer(&r, GET, StatusCode::BAD_GATEWAY, 0),
            AfterAnswer::Answer { exhausted: false },
            "not a retryable code of this route"
        );
        assert_eq!(
            after_answer(&r, POST, unavailable, 0),
            AfterAnswer::Answer { exhausted: false },
            "a POST may have had effects"
        );
        let streamed = Repeatable {
            idempotent: true,
            replayable: false,
        };
        assert_eq!(
            after_answer(&r, streamed, unavailable, 0),
            AfterAnswer::Answer { exhausted: false },
            "a streamed body went with the first try"
        );
    }

    #[test]
    fn a_refused_connection_is_retried_even_for_a_post() {
        assert!(may_retry_failure(POST, true));
        assert!(!may_retry_failure(POST, false), "it may have been sent");
        assert!(may_retry_failure(GET, false));
        let streamed = Repeatable {
            idempotent: true,
            replayable: false,
        };
        assert!(!may_retry_failure(streamed, true));
    }
}
