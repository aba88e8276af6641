//! The one way tests build the objects they create: a job or a recurring definition from a JSON spec (as a user
//! writes it), with the labels and annotations a test needs. An invalid spec panics: it is the test's own mistake.

use bgjobs::api::{BackgroundJob, RecurringBackgroundJob};
use serde_json::Value;

/// A BackgroundJob under construction.
pub struct JobBuilder(BackgroundJob);

impl JobBuilder {
    /// A job named `name` with the spec `spec` (JSON, as in a manifest).
    pub fn new(name: &str, spec: Value) -> JobBuilder {
        JobBuilder(BackgroundJob::new(name, serde_json::from_value(spec).expect("a valid BackgroundJob spec")))
    }

    /// Add a label.
    pub fn label(mut self, key: &str, value: &str) -> JobBuilder {
        self.0.metadata.labels.get_or_insert_with(Default::default).insert(key.into(), value.into());
        self
    }

    /// Add an annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> JobBuilder {
        self.0.metadata.annotations.get_or_insert_with(Default::default).insert(key.into(), value.into());
        self
    }

    /// The job.
    pub fn build(self) -> BackgroundJob {
        self.0
    }
}

/// A job named `name` with the spec `spec` (JSON), nothing else set.
pub fn job(name: &str, spec: Value) -> BackgroundJob {
    JobBuilder::new(name, spec).build()
}

/// A RecurringBackgroundJob named `name` with the spec `spec` (JSON).
pub fn recurring(name: &str, spec: Value) -> RecurringBackgroundJob {
    RecurringBackgroundJob::new(name, serde_json::from_value(spec).expect("a valid RecurringBackgroundJob spec"))
}
