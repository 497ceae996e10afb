//! The guarded service's response body, recording a successful call when its body ends.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::circuit::Permit;
use crate::error::{ApiError, ErrorCode};
use crate::policy::StreamEnd;

pin_project! {
    /// The inner service's response body. For a successful answer of a guarded call it holds
    /// the call's permit and records the outcome when the body ends: a clean end is a
    /// success, a body error (the upstream cut the stream) a failure, both through the
    /// policy's [`classify_eos`](crate::policy::Classify::classify_eos). A body dropped
    /// before its end (the client went away) is neither; a probe's slot is given back.
    ///
    /// Every other answer (an error head, a fallback's answer, an unguarded call) passes
    /// through it untouched.
    pub struct GuardedBody<B> {
        #[pin]
        body: B,
        permit: Option<Permit>,
    }
}

impl<B> GuardedBody<B> {
    /// `body`, recording nothing.
    pub(crate) fn unguarded(body: B) -> Self {
        GuardedBody { body, permit: None }
    }

    /// `body`, recording the call of `permit` when it ends.
    pub(crate) fn guarded(body: B, permit: Permit) -> Self {
        GuardedBody {
            body,
            permit: Some(permit),
        }
    }

    /// Whether the call's outcome is still to be recorded at the end of this body.
    pub fn is_recording(&self) -> bool {
        self.permit.is_some()
    }

    /// The inner body (an outcome still to be recorded is dropped with the permit, as a body
    /// dropped before its end).
    pub fn into_inner(self) -> B {
        self.body
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for GuardedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedBody")
            .field("body", &self.body)
            .field("recording", &self.permit.is_some())
            .finish()
    }
}

impl<B: Body> Body for GuardedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.body.as_mut().poll_frame(cx));
        if this.permit.is_some() {
            // A layer inside that ended the stream in-band names the failure in a trailer.
            let marked = match &frame {
                Some(Ok(f)) => f.trailers_ref().and_then(crate::policy::stream_error_in),
                _ => None,
            };
            let err;
            let end = match (&frame, marked) {
                (_, Some(ErrorCode::Timeout)) => Some(StreamEnd::TimedOut),
                (_, Some(code)) => {
                    err = ApiError::new(code, "The stream ended with an in-band error.");
                    Some(StreamEnd::Error(&err))
                }
                (None, None) => Some(StreamEnd::Complete),
                (Some(Err(_)), None) => Some(StreamEnd::Cut),
                (Some(Ok(_)), None) if this.body.is_end_stream() => Some(StreamEnd::Complete),
                (Some(Ok(_)), None) => None,
            };
            if let Some(end) = end {
                if let Some(p) = this.permit.take() {
                    p.stream_end(&end);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
