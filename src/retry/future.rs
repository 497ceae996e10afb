//! The response future: a state machine over buffering, readiness, attempts and waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::body::{announced_length, check_limit, BoxError, BufferBody, BufferError, LayerBody};
use crate::classify::classify_head;
use crate::error::{ApiError, ErrorCode, X_SHOULD_RETRY};
use crate::ext::{Attempts, RefusedLocally};
use crate::policy::{classify_error, classify_error_ref, Classify, FailureKind, Outcome};

use super::backoff::uniform;
use super::config::{RetryEvent, RetryStop, Shared, TransportErrors};
use super::safety::{generate_key, idempotent, IDEMPOTENCY_KEY};
use super::{X_ATTEMPTS, X_RETRY_STOP};

const ATTEMPT_VALUES: [&str; 11] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];

/// How far ahead a wait or deadline that does not fit an `Instant` is put: 30 years, as tokio
/// does for `sleep(Duration::MAX)`.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + d`, saturated: a configured `Duration::MAX` never overflows the clock.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        // Reading the request body so it can be replayed (the head waits in `head`); the
        // inner service is not polled yet.
        Buffering { #[pin] buf: BufferBody<B> },
        // Waiting for the inner service to be ready for the next attempt: the request sent
        // once, or a replay of the buffered one (see `head`).
        Ready,
        // An attempt is in flight.
        Calling { #[pin] fut: F },
        // Waiting out the backoff (the timer holds the wait).
        Waiting,
        Done,
    }
}

pin_project! {
    /// The response future of [`super::Retry`].
    ///
    /// A state machine: buffer the body, wait for the inner service to be ready, call,
    /// classify, wait, and again. It holds its own clone of the inner service (polled ready
    /// only once the body is buffered), the request head and the buffered body for replays,
    /// and one timer that serves as the per-attempt timeout, the deadline and the backoff
    /// sleep.
    #[project = FutProj]
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<LayerBody<B>>>,
    {
        #[pin]
        state: State<S::Future, B>,
        #[pin]
        timer: Option<Sleep>,
        timer_armed: bool,
        service: S,
        shared: Arc<Shared>,
        // The head to replay, or the request sent once until it is sent.
        head: Head<B>,
        bytes: Bytes,
        attempt: u32,
        deadline: Option<Instant>,
        prev_delay: Duration,
        rng: Option<fastrand::Rng>,
        skipped: Option<RetryStop>,
        // For the layer's own rejections: the request's key id and route.
        labels: crate::metrics::RequestLabels,
    }
}

/// What the future keeps of the request.
enum Head<B> {
    /// The head of a replayable request, its body in `bytes`.
    Replay(Parts),
    /// The request sent once, unbuffered, until it is sent.
    Once(Request<LayerBody<B>>),
    /// The request sent once is on its way: nothing to replay.
    Sent,
}

/// How an attempt ended.
enum Ended<R, E> {
    Response(R),
    Transport(E),
    TimedOut,
}

impl<S, B, ResB> ResponseFuture<S, B>
where
    S: Service<Request<LayerBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError> + 'static,
    B: Body,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(service: S, shared: Arc<Shared>, req: Request<B>) -> Self {
        let labels = crate::metrics::RequestLabels::capture(req.extensions());
        let mut fut = Self::start(service, shared, req);
        fut.labels = labels;
        fut
    }

    fn start(service: S, shared: Arc<Shared>, mut req: Request<B>) -> Self {
        let needs_now = shared.budget.is_some() || shared.deadline.is_some();
        let mut deadline = None;
        if needs_now {
            let now = Instant::now();
            if let Some(budget) = &shared.budget {
                budget.deposit(now);
            }
            deadline = shared.deadline.map(|d| later(now, d));
        }
        if let Some(d) = deadline {
            req.extensions_mut().insert(crate::ext::Deadline(d));
        }
        let once = |req: Request<B>| (State::Ready, Head::Once(req.map(LayerBody::new)));
        if shared.max_attempts == 1 {
            return Self::with(once(req), service, shared, deadline, None);
        }
        if shared.idempotency_keys
            && !idempotent(req.method())
            && !req.headers().contains_key(IDEMPOTENCY_KEY)
        {
            req.headers_mut().insert(IDEMPOTENCY_KEY, generate_key());
        }
        if !shared.replayable(&req) {
            // Sent once, untouched and unbuffered: a second copy could do the work twice.
            let stop = Some(RetryStop::NotIdempotent);
            return Self::with(once(req), service, shared, deadline, stop);
        }
        let limit = shared.body_limit;
        if check_limit(req.headers(), req.body(), limit).is_err() {
            tracing::debug!(
                target: "llm_layers::retry",
                limit,
                announced = announced_length(req.headers()).unwrap_or(req.body().size_hint().lower()),
                "request body over the replay limit: sent once, without retries"
            );
            let stop = Some(RetryStop::BodyTooLarge);
            return Self::with(once(req), service, shared, deadline, stop);
        }
        let (parts, body) = req.into_parts();
        let state = if body.size_hint().exact() == Some(0) {
            // Nothing to read: replayed with an empty body.
            State::Ready
        } else {
            // The limit was checked above, announced length and size hint alike.
            State::Buffering {
                buf: BufferBody::new(body, limit),
            }
        };
        Self::with(
            (state, Head::Replay(parts)),
            service,
            shared,
            deadline,
            None,
        )
    }

    fn with(
        (state, head): (State<S::Future, B>, Head<B>),
        service: S,
        shared: Arc<Shared>,
        deadline: Option<Instant>,
        skipped: Option<RetryStop>,
    ) -> Self {
        ResponseFuture {
            state,
            timer: None,
            timer_armed: false,
            service,
            shared,
            head,
            bytes: Bytes::new(),
            attempt: 0,
            deadline,
            prev_delay: Duration::ZERO,
            rng: None,
            skipped,
            labels: crate::metrics::RequestLabels::NONE,
        }
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<LayerBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError> + 'static,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<LayerBody<ResB>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let ended = match this.state.as_mut().project() {
                StateProj::Buffering { buf } => match ready!(buf.poll(cx)) {
                    Ok(bytes) => {
                        *this.bytes = bytes;
                        this.state.set(State::Ready);
                        continue;
                    }
                    Err(e) => {
                        // A body that grew past the limit is partly consumed and cannot be
                        // handed on: the honest answer is 413 (400 for a broken body).
                        if let BufferError::TooLarge { limit } = e {
                            tracing::debug!(
                                target: "llm_layers::retry",
                                limit,
                                "chunked request body grew past the replay limit"
                            );
                        }
                        let err = e.to_api_error();
                        this.state.set(State::Done);
                        this.labels
                            .rejected(crate::metrics::layer::RETRY, err.code());
                        return Poll::Ready(Ok(local_rejection(&err, this.shared)));
                    }
                },
                StateProj::Ready => match this.service.poll_ready(cx) {
                    Poll::Pending => {
                        // Waiting for the inner service to take the attempt counts against
                        // the deadline too.
                        let Some(deadline) = *this.deadline else {
                            return Poll::Pending;
                        };
                        if !*this.timer_armed {
                            set_timer(this.timer.as_mut(), deadline);
                            *this.timer_armed = true;
                        }
                        let fired = this
                            .timer
                            .as_mut()
                            .as_pin_mut()
                            .is_some_and(|t| t.poll(cx).is_ready());
                        if !fired {
                            return Poll::Pending;
                        }
                        *this.timer_armed = false;
                        Ended::TimedOut
                    }
                    Poll::Ready(Ok(())) => {
                        let req = match this.head {
                            Head::Replay(parts) => replay(parts, this.bytes),
                            // Sent once: never back here after it (`decide` stops).
                            head => match std::mem::replace(head, Head::Sent) {
                                Head::Once(req) => req,
                                _ => panic!("a request sent once is sent once"),
                            },
                        };
                        *this.attempt += 1;
                        let fut = this.service.call(req);
                        this.state.set(State::Calling { fut });
                        arm_attempt_timer(
                            this.timer.as_mut(),
                            this.timer_armed,
                            this.shared,
                            *this.deadline,
                        );
                        continue;
                    }
                    Poll::Ready(Err(e)) => {
                        // A service that failed to become ready is broken (tower's rule): its
                        // error is final, and the service is not polled again.
                        tracing::debug!(
                            target: "llm_layers::retry",
                            attempt = *this.attempt,
                            "inner service failed to become ready: not retrying"
                        );
                        this.state.set(State::Done);
                        return Poll::Ready(Err(e));
                    }
                },
                StateProj::Calling { fut } => match fut.poll(cx) {
                    Poll::Ready(Ok(res)) => Ended::Response(res),
                    Poll::Ready(Err(e)) => Ended::Transport(e),
                    Poll::Pending => {
                        if !*this.timer_armed {
                            return Poll::Pending;
                        }
                        let fired = this
                            .timer
                            .as_mut()
                            .as_pin_mut()
                            .is_some_and(|t| t.poll(cx).is_ready());
                        if !fired {
                            return Poll::Pending;
                        }
                        *this.timer_armed = false;
                        Ended::TimedOut
                    }
                },
                StateProj::Waiting => {
                    if let Some(t) = this.timer.as_mut().as_pin_mut() {
                        ready!(t.poll(cx));
                    }
                    *this.timer_armed = false;
                    this.state.set(State::Ready);
                    continue;
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };

            // An attempt ended: decide whether to answer or to go again.
            let attempt = *this.attempt;
            match ended {
                Ended::Response(res) => {
                    // The policy says what the head means, seeing the `ApiError` an inner
                    // layer left (its whole classification) when there is one.
                    let found = res.extensions().get::<ApiError>();
                    let outcome =
                        this.shared
                            .policy
                            .classify_response(res.status(), res.headers(), found);
                    let Outcome::Failure { code, kind } = outcome else {
                        this.state.set(State::Done);
                        let res = res.map(LayerBody::new);
                        return Poll::Ready(Ok(finish(res, attempt, *this.skipped, this.shared)));
                    };
                    if let Some(refused) = res.extensions().get::<RefusedLocally>() {
                        // The wait it reports is how long a local state lasts: answered at
                        // once, with no budget spent.
                        tracing::debug!(
                            target: "llm_layers::retry",
                            attempt,
                            by = refused.by,
                            "refused locally: not waiting"
                        );
                        this.state.set(State::Done);
                        let stop = Some(RetryStop::RefusedLocally);
                        let res = res.map(LayerBody::new);
                        return Poll::Ready(Ok(finish(res, attempt, stop, this.shared)));
                    }
                    // The wait and the upstream's own `x-should-retry` travel in the error:
                    // the inner layer's, else the head's classification.
                    let err = match found {
                        Some(e) => e.clone(),
                        None => classify_head(res.status(), res.headers()).unwrap_or_else(|| {
                            ApiError::new(code, "The policy classified the answer as a failure.")
                                .with_upstream_status(res.status())
                        }),
                    }
                    .with_code(code);
                    let said = err.upstream_should_retry();
                    match this.decide(&err, kind, said) {
                        Ok(delay) => {
                            drop(res);
                            this.schedule(delay, &err);
                        }
                        Err(stop) => {
                            this.state.set(State::Done);
                            log_stop(attempt, stop, &err);
                            let stop = this.skipped.or(Some(stop));
                            let res = res.map(LayerBody::new);
                            return Poll::Ready(Ok(finish(res, attempt, stop, this.shared)));
                        }
                    }
                }
                Ended::Transport(e) => {
                    // Any error type: a tower `Elapsed` in a `BoxError` is a timeout. An error
                    // that may still be returned is looked at where it is; one that never is
                    // (the envelope mode) is taken, so that its whole chain is read whatever
                    // its type.
                    let (err, kept) = if this.shared.transport_errors == TransportErrors::Propagate
                    {
                        (classify_error_ref(&e), Some(e))
                    } else {
                        (classify_error(e), None)
                    };
                    let kind = FailureKind::of(err.code());
                    match this.decide(&err, kind, None) {
                        Ok(delay) => {
                            drop(kept);
                            this.schedule(delay, &err);
                        }
                        Err(stop) => {
                            this.state.set(State::Done);
                            log_stop(attempt, stop, &err);
                            if let Some(e) = kept {
                                return Poll::Ready(Err(e));
                            }
                            let stop = this.skipped.or(Some(stop));
                            let res = err.to_response();
                            return Poll::Ready(Ok(finish(res, attempt, stop, this.shared)));
                        }
                    }
                }
                Ended::TimedOut => {
                    let past_deadline = this.deadline.is_some_and(|d| Instant::now() >= d);
                    let err = ApiError::new(
                        ErrorCode::Timeout,
                        if past_deadline {
                            "The upstream did not answer before the deadline."
                        } else {
                            "The upstream did not answer within the attempt timeout."
                        },
                    );
                    let decision = if past_deadline {
                        Err(RetryStop::Deadline)
                    } else {
                        this.decide(&err, FailureKind::of(ErrorCode::Timeout), None)
                    };
                    match decision {
                        Ok(delay) => this.schedule(delay, &err),
                        Err(stop) => {
                            this.state.set(State::Done);
                            log_stop(attempt, stop, &err);
                            this.labels
                                .rejected(crate::metrics::layer::RETRY, err.code());
                            let stop = this.skipped.or(Some(stop));
                            let res = err.to_response();
                            return Poll::Ready(Ok(finish(res, attempt, stop, this.shared)));
                        }
                    }
                }
            }
        }
    }
}

impl<S, B> FutProj<'_, S, B>
where
    S: Service<Request<LayerBody<B>>>,
{
    /// Whether (and after which wait) to try again after `err`, a failure of `kind`; `said`
    /// is the upstream's `x-should-retry`.
    fn decide(
        &mut self,
        err: &ApiError,
        kind: FailureKind,
        said: Option<bool>,
    ) -> Result<Duration, RetryStop> {
        let shared = &**self.shared;
        if !shared.wants_retry(err, kind, said) {
            return Err(RetryStop::NotRetryable);
        }
        if !matches!(self.head, Head::Replay(_)) {
            return Err(self.skipped.unwrap_or(RetryStop::AttemptsExhausted));
        }
        let attempt = *self.attempt;
        if attempt >= shared.max_attempts {
            return Err(RetryStop::AttemptsExhausted);
        }
        let rng = self.rng.get_or_insert_with(|| match shared.seed {
            Some(seed) => fastrand::Rng::with_seed(
                seed.wrapping_add(shared.seq.fetch_add(1, Ordering::Relaxed)),
            ),
            None => fastrand::Rng::new(),
        });
        let (delay, past_deadline) = match err.retry_after() {
            Some(hint) if hint > shared.max_retry_after => return Err(RetryStop::HintTooLong),
            Some(hint) => (
                hint.saturating_add(uniform(rng, Duration::ZERO, shared.hint_jitter)),
                RetryStop::HintPastDeadline,
            ),
            None => (
                shared.backoff.delay(attempt, *self.prev_delay, rng),
                RetryStop::Deadline,
            ),
        };
        let needs_now = self.deadline.is_some() || shared.budget.is_some();
        if needs_now {
            let now = Instant::now();
            if self.deadline.is_some_and(|d| later(now, delay) >= d) {
                return Err(past_deadline);
            }
            if let Some(budget) = &shared.budget {
                if !budget.withdraw(now) {
                    return Err(RetryStop::BudgetExhausted);
                }
            }
        }
        Ok(delay)
    }

    /// Starts the wait before the next attempt.
    fn schedule(&mut self, delay: Duration, err: &ApiError) {
        let attempt = *self.attempt;
        crate::metrics::retry_scheduled(err.code());
        tracing::debug!(
            target: "llm_layers::retry",
            layer = "retry",
            attempt,
            delay_ms = delay.as_millis() as u64,
            code = err.code().as_str(),
            status = err.status().as_u16(),
            "retrying"
        );
        if let Some(hook) = &self.shared.on_retry {
            hook(&RetryEvent {
                attempt,
                delay,
                error: err,
            });
        }
        *self.prev_delay = delay;
        set_timer(self.timer.as_mut(), later(Instant::now(), delay));
        *self.timer_armed = true;
        self.state.set(State::Waiting);
    }
}

fn set_timer(mut timer: Pin<&mut Option<Sleep>>, at: Instant) {
    match timer.as_mut().as_pin_mut() {
        Some(sleep) => sleep.reset(at),
        None => timer.set(Some(tokio::time::sleep_until(at))),
    }
}

fn arm_attempt_timer(
    timer: Pin<&mut Option<Sleep>>,
    armed: &mut bool,
    shared: &Shared,
    deadline: Option<Instant>,
) {
    let at = match (shared.attempt_timeout, deadline) {
        (None, None) => {
            *armed = false;
            return;
        }
        (Some(t), d) => {
            let at = later(Instant::now(), t);
            d.map_or(at, |d| d.min(at))
        }
        (None, Some(d)) => d,
    };
    set_timer(timer, at);
    *armed = true;
}

fn replay<B>(parts: &Parts, bytes: &Bytes) -> Request<LayerBody<B>> {
    Request::from_parts(parts.clone(), LayerBody::full(bytes.clone()))
}

fn finish<R>(
    mut res: Response<R>,
    attempts: u32,
    stop: Option<RetryStop>,
    shared: &Shared,
) -> Response<R> {
    crate::metrics::retry_finished(attempts, stop);
    if attempts > 1 || stop.is_some() {
        tracing::debug!(
            target: "llm_layers::retry",
            layer = "retry",
            attempts,
            status = res.status().as_u16(),
            stop = stop.map(RetryStop::as_str),
            "answered"
        );
    }
    res.extensions_mut().insert(Attempts(attempts));
    if let Some(stop) = stop {
        res.extensions_mut().insert(stop);
    }
    // `x-should-retry: false` says "this was retried already": only when the layer did retry
    // and then gave up on an error it would otherwise have retried. A stop on the first
    // attempt leaves the upstream's (or the refusing layer's) word, `retry-after` included.
    let gave_up = attempts > 1
        && matches!(
            stop,
            Some(
                RetryStop::AttemptsExhausted
                    | RetryStop::BudgetExhausted
                    | RetryStop::Deadline
                    | RetryStop::HintTooLong
                    | RetryStop::HintPastDeadline
            )
        );
    if shared.mark_exhausted && gave_up {
        res.headers_mut()
            .insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    }
    if shared.attempts_header {
        let headers = res.headers_mut();
        headers.insert(
            X_ATTEMPTS,
            HeaderValue::from_static(ATTEMPT_VALUES[attempts.min(10) as usize]),
        );
        if let Some(stop) = stop {
            headers.insert(X_RETRY_STOP, HeaderValue::from_static(stop.as_str()));
        }
    }
    res
}

fn local_rejection<R>(err: &ApiError, shared: &Shared) -> Response<LayerBody<R>> {
    finish(err.to_response(), 0, None, shared)
}

fn log_stop(attempt: u32, stop: RetryStop, err: &ApiError) {
    tracing::debug!(
        target: "llm_layers::retry",
        layer = "retry",
        attempt,
        reason = stop.as_str(),
        code = err.code().as_str(),
        "not retrying"
    );
}
