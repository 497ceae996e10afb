//! Tower middleware that makes traffic to LLM APIs behave.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod body;
pub mod classify;
pub mod error;
pub mod ext;
#[cfg(feature = "rate-limit")]
pub mod rate_limit;
pub mod request;

pub use error::{ApiError, ErrorCode};
