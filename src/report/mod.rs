//! Asynchronous completion: work that runs outside the operator reports its own outcome.
//!
//! Tokens ([`token`]) and the pure decisions about reports ([`decide`]).

pub mod decide;
pub mod token;

pub use decide::{MAX_RESULT_BYTES, Refusal, Report, awaits_report};
