//! Classification: what an answer means for the circuit. Knows nothing of states.

use std::sync::Arc;

use http::{Response, StatusCode};

use crate::classify::code_for_status;
use crate::error::{ApiError, ErrorCode};

/// What one call means for the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The upstream served the call.
    Success,
    /// The upstream failed the call: it counts towards opening.
    Failure,
    /// Neither: the caller was at fault (a bad request, a bad key, a blocked prompt) and the
    /// call says nothing of the upstream's health. Not counted; a probe's slot is given back.
    Ignored,
}

/// The outcome of an error code by default: provider failures (`internal_error`,
/// `service_unavailable`, `timeout`, `upstream_blocked`) fail; throttling fails only when
/// `trip_on_rate_limit`; everything the caller caused is ignored.
pub fn outcome_for_code(code: ErrorCode, trip_on_rate_limit: bool) -> Outcome {
    match code {
        ErrorCode::InternalError
        | ErrorCode::ServiceUnavailable
        | ErrorCode::Timeout
        | ErrorCode::UpstreamBlocked => Outcome::Failure,
        ErrorCode::RateLimitExceeded | ErrorCode::ConcurrentLimitExceeded if trip_on_rate_limit => {
            Outcome::Failure
        }
        _ => Outcome::Ignored,
    }
}

type CustomClassifier = Arc<dyn Fn(StatusCode, Option<&ApiError>) -> Outcome + Send + Sync>;

#[derive(Clone, Default)]
pub(crate) struct Classifier {
    pub(crate) trip_on_rate_limit: bool,
    pub(crate) custom: Option<CustomClassifier>,
}

impl Classifier {
    /// Classifies a response head: the [`ApiError`] an inner layer left in the extensions,
    /// else the status alone (no allocation).
    pub(crate) fn response<B>(&self, res: &Response<B>) -> Outcome {
        let status = res.status();
        let err = res.extensions().get::<ApiError>();
        if let Some(custom) = &self.custom {
            if err.is_none() && (status.is_client_error() || status.is_server_error()) {
                let classified = crate::classify::classify_head(status, res.headers());
                return custom(status, classified.as_ref());
            }
            return custom(status, err);
        }
        if let Some(err) = err {
            return outcome_for_code(err.code(), self.trip_on_rate_limit);
        }
        if status.is_client_error() || status.is_server_error() {
            outcome_for_code(code_for_status(status), self.trip_on_rate_limit)
        } else {
            Outcome::Success
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(status: u16) -> Response<()> {
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let c = Classifier::default();
        for (s, o) in [
            (200, Outcome::Success),
            (500, Outcome::Failure),
            (502, Outcome::Failure),
            (503, Outcome::Failure),
            (504, Outcome::Failure),
            (529, Outcome::Failure),
            (400, Outcome::Ignored),
            (401, Outcome::Ignored),
            (404, Outcome::Ignored),
            (429, Outcome::Ignored),
        ] {
            assert_eq!(c.response(&res(s)), o, "status {s}");
        }
        let c = Classifier {
            trip_on_rate_limit: true,
            custom: None,
        };
        assert_eq!(c.response(&res(429)), Outcome::Failure);
    }

    #[test]
    fn the_error_in_the_extensions_wins_over_the_status() {
        let c = Classifier::default();
        let mut r = res(400);
        r.extensions_mut()
            .insert(ApiError::new(ErrorCode::Timeout, "slow"));
        assert_eq!(c.response(&r), Outcome::Failure);
        let mut r = res(500);
        r.extensions_mut()
            .insert(ApiError::new(ErrorCode::ContentPolicyViolation, "blocked"));
        assert_eq!(c.response(&r), Outcome::Ignored);
    }
}
