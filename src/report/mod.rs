//! Asynchronous completion: work that runs outside the operator reports its own outcome.

mod apply;
pub mod client;
pub mod decide;
pub mod server;
pub mod token;

pub use apply::{Applied, apply};
pub use decide::{MAX_RESULT_BYTES, Refusal, Report, awaits_report};
