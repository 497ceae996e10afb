//! The response future: a state machine over buffering, attempts and waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_LENGTH};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::body::BufferError;
use crate::classify::{classify_head, classify_transport_error};
use crate::error::{ApiError, ErrorCode, X_SHOULD_RETRY};
use crate::ext::{Attempts, RefusedLocally};

use super::backoff::uniform;
use super::config::{RetryEvent, RetryStop, Shared, TransportErrors};
use super::safety::{generate_key, idempotent, IDEMPOTENCY_KEY};
use super::{BoxError, X_ATTEMPTS, X_RETRY_STOP};

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
        // Reading the request body into `bytes` so it can be replayed.
        Buffering { #[pin] body: B },
        // The first attempt is ready to go with this request.
        Start { req: Option<Request<B>> },
        // An attempt is in flight.
        Calling { #[pin] fut: F },
        // Waiting out the backoff (the timer holds the wait).
        Waiting,
        // The wait is over; waiting for the service to be ready again.
        Ready,
        Done,
    }
}

pin_project! {
    /// The response future of [`super::Retry`].
    ///
    /// A state machine: buffer the body, call, classify, wait, call again. It holds the ready
    /// inner service, the request head and the buffered body for replays, and one timer that
    /// serves both as the per-attempt timeout and as the backoff sleep.
    #[project = FutProj]
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, B>,
        #[pin]
        timer: Option<Sleep>,
        timer_armed: bool,
        service: S,
        shared: Arc<Shared>,
        // The head to replay; `None` when the request is not replayable.
        parts: Option<Parts>,
        bytes: Bytes,
        acc: BytesMut,
        attempt: u32,
        deadline: Option<Instant>,
        prev_delay: Duration,
        rng: Option<fastrand::Rng>,
        skipped: Option<RetryStop>,
    }
}

enum Outcome<R, E> {
    Response(R),
    Transport(E),
    TimedOut,
}

impl<S, B, ResB> ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: std::error::Error + 'static,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
    ResB: From<Bytes>,
{
    pub(crate) fn new(service: S, shared: Arc<Shared>, mut req: Request<B>) -> Self {
        let needs_now = shared.budget.is_some() || shared.deadline.is_some();
        let mut deadline = None;
        if needs_now {
            let now = Instant::now();
            if let Some(budget) = &shared.budget {
                budget.deposit(now);
            }
            deadline = shared.deadline.map(|d| later(now, d));
        }
        let limit = shared.body_limit as u64;
        let mut skipped = None;
        if shared.max_attempts == 1 {
            return Self::with(
                State::Start { req: Some(req) },
                None,
                service,
                shared,
                deadline,
                None,
            );
        }
        if shared.idempotency_keys
            && !idempotent(req.method())
            && !req.headers().contains_key(IDEMPOTENCY_KEY)
        {
            req.headers_mut().insert(IDEMPOTENCY_KEY, generate_key());
        }
        if !shared.replayable(&req) {
            // Sent once, untouched and unbuffered: a second copy could do the work twice.
            return Self::with(
                State::Start { req: Some(req) },
                None,
                service,
                shared,
                deadline,
                Some(RetryStop::NotIdempotent),
            );
        }
        let announced = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let hint = req.body().size_hint();
        let (state, parts) = if announced.is_some_and(|n| n > limit) || hint.lower() > limit {
            tracing::debug!(
                target: "llm_layers::retry",
                limit,
                announced = announced.unwrap_or(hint.lower()),
                "request body over the replay limit: sent once, without retries"
            );
            skipped = Some(RetryStop::BodyTooLarge);
            (State::Start { req: Some(req) }, None)
        } else {
            let (parts, body) = req.into_parts();
            if hint.exact() == Some(0) {
                let req = Request::from_parts(parts.clone(), B::from(Bytes::new()));
                (State::Start { req: Some(req) }, Some(parts))
            } else {
                (State::Buffering { body }, Some(parts))
            }
        };
        Self::with(state, parts, service, shared, deadline, skipped)
    }

    fn with(
        state: State<S::Future, B>,
        parts: Option<Parts>,
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
            parts,
            bytes: Bytes::new(),
            acc: BytesMut::new(),
            attempt: 0,
            deadline,
            prev_delay: Duration::ZERO,
            rng: None,
            skipped,
        }
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: std::error::Error + 'static,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
    ResB: From<Bytes>,
{
    type Output = Result<Response<ResB>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let outcome = match this.state.as_mut().project() {
                StateProj::Buffering { mut body } => {
                    let limit = this.shared.body_limit;
                    loop {
                        match ready!(body.as_mut().poll_frame(cx)) {
                            None => break,
                            Some(Err(e)) => {
                                let err = BufferError::Read(e.into()).to_api_error();
                                this.state.set(State::Done);
                                return Poll::Ready(Ok(local_rejection(&err, this.shared)));
                            }
                            Some(Ok(frame)) => {
                                // Request trailers are not replayed; LLM APIs do not use them.
                                let Ok(mut data) = frame.into_data() else {
                                    continue;
                                };
                                let n = data.remaining();
                                // Once `acc` is in use it holds everything read so far.
                                let read = if this.acc.is_empty() {
                                    this.bytes.len()
                                } else {
                                    this.acc.len()
                                };
                                if read + n > limit {
                                    // Part of the body is consumed and cannot be handed on:
                                    // the honest answer is 413.
                                    tracing::debug!(
                                        target: "llm_layers::retry",
                                        limit,
                                        "chunked request body grew past the replay limit"
                                    );
                                    let err = BufferError::TooLarge { limit }.to_api_error();
                                    this.state.set(State::Done);
                                    return Poll::Ready(Ok(local_rejection(&err, this.shared)));
                                }
                                if this.bytes.is_empty() && this.acc.is_empty() {
                                    *this.bytes = data.copy_to_bytes(n);
                                } else {
                                    if this.acc.is_empty() {
                                        this.acc.reserve(this.bytes.len() + n);
                                        this.acc.extend_from_slice(this.bytes);
                                    }
                                    this.acc.put(data);
                                }
                            }
                        }
                    }
                    if !this.acc.is_empty() {
                        *this.bytes = std::mem::take(this.acc).freeze();
                    }
                    let req = replay(this.parts.as_ref(), this.bytes);
                    this.state.set(State::Start { req: Some(req) });
                    continue;
                }
                StateProj::Start { req } => {
                    let req = req.take().expect("polled after start");
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
                StateProj::Calling { fut } => match fut.poll(cx) {
                    Poll::Ready(Ok(res)) => Outcome::Response(res),
                    Poll::Ready(Err(e)) => Outcome::Transport(e),
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
                        Outcome::TimedOut
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
                StateProj::Ready => match this.service.poll_ready(cx) {
                    Poll::Pending => {
                        // Waiting for the inner service to take the next attempt counts
                        // against the deadline too.
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
                        Outcome::TimedOut
                    }
                    Poll::Ready(Ok(())) => {
                        let req = replay(this.parts.as_ref(), this.bytes);
                        this.state.set(State::Start { req: Some(req) });
                        continue;
                    }
                    Poll::Ready(Err(e)) => Outcome::Transport(e),
                },
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };

            // An attempt ended: decide whether to answer or to go again.
            let attempt = *this.attempt;
            match outcome {
                Outcome::Response(res) => {
                    // An inner layer's `ApiError` is its whole classification, else the head is
                    // classified; either way the upstream's own `x-should-retry` travels in it.
                    let err = match res.extensions().get::<ApiError>() {
                        Some(e) => Some(e.clone()),
                        None => classify_head(res.status(), res.headers()),
                    };
                    let said = err.as_ref().and_then(ApiError::upstream_should_retry);
                    let Some(err) = err else {
                        this.state.set(State::Done);
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
                        return Poll::Ready(Ok(finish(res, attempt, stop, this.shared)));
                    }
                    match this.decide(&err, said) {
                        Ok(delay) => {
                            drop(res);
                            this.schedule(delay, &err);
                        }
                        Err(stop) => {
                            this.state.set(State::Done);
                            log_stop(attempt, stop, &err);
                            let stop = this.skipped.or(Some(stop));
                            return Poll::Ready(Ok(finish(res, attempt, stop, this.shared)));
                        }
                    }
                }
                Outcome::Transport(e) => {
                    let err = classify_transport_error(&e);
                    match this.decide(&err, None) {
                        Ok(delay) => {
                            drop(e);
                            this.schedule(delay, &err);
                        }
                        Err(stop) => {
                            this.state.set(State::Done);
                            log_stop(attempt, stop, &err);
                            if this.shared.transport_errors == TransportErrors::Propagate {
                                return Poll::Ready(Err(e));
                            }
                            let stop = this.skipped.or(Some(stop));
                            let res = err.to_response();
                            return Poll::Ready(Ok(finish(res, attempt, stop, this.shared)));
                        }
                    }
                }
                Outcome::TimedOut => {
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
                        this.decide(&err, None)
                    };
                    match decision {
                        Ok(delay) => this.schedule(delay, &err),
                        Err(stop) => {
                            this.state.set(State::Done);
                            log_stop(attempt, stop, &err);
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
    S: Service<Request<B>>,
{
    /// Whether (and after which wait) to try again after `err`; `said` is the upstream's
    /// `x-should-retry`.
    fn decide(&mut self, err: &ApiError, said: Option<bool>) -> Result<Duration, RetryStop> {
        let shared = &**self.shared;
        if !shared.wants_retry(err, said) {
            return Err(RetryStop::NotRetryable);
        }
        if self.parts.is_none() {
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
        tracing::debug!(
            target: "llm_layers::retry",
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

fn replay<B: From<Bytes>>(parts: Option<&Parts>, bytes: &Bytes) -> Request<B> {
    let parts = parts
        .expect("only replayable requests are replayed")
        .clone();
    Request::from_parts(parts, B::from(bytes.clone()))
}

fn finish<R>(
    mut res: Response<R>,
    attempts: u32,
    stop: Option<RetryStop>,
    shared: &Shared,
) -> Response<R> {
    if attempts > 1 || stop.is_some() {
        tracing::debug!(
            target: "llm_layers::retry",
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

fn local_rejection<R: From<Bytes>>(err: &ApiError, shared: &Shared) -> Response<R> {
    finish(err.to_response(), 0, None, shared)
}

fn log_stop(attempt: u32, stop: RetryStop, err: &ApiError) {
    tracing::debug!(
        target: "llm_layers::retry",
        attempt,
        reason = stop.as_str(),
        code = err.code().as_str(),
        "not retrying"
    );
}
