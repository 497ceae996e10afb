//! Tower middleware that makes traffic to LLM APIs behave.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod body;
pub mod classify;
pub mod error;
pub mod ext;
pub mod request;
pub mod retry;

pub use error::{ApiError, ErrorCode};
