//! What bgjobs writes on the cluster, for the tools that read it (dashboards, audits, this repository's tests,
//! checker and benchmarks): the labels and annotations on jobs and Leases, the Leases' names, how to read a Lease,
//! how a recurring tick is claimed and the job it creates, and the order and bound the dispatch keeps. Each is a
//! contract with running replicas: changing one is a breaking change (docs/install.md, upgrades).

pub use crate::admission::{CREATED_BY, CREATED_BY_GROUPS, DEFINITION_CREATED_BY, PATH as ADMISSION_PATH};
pub use crate::claim::{JOB_LABEL, lease_name as claim_lease_name};
pub use crate::exclusive::EXCLUSIVE_LEASE;
pub use crate::keys::{KEY_LABEL, lease_name as key_lease_name};
pub use crate::lease::tenure::{HELD_BY_LABEL, REVOKED_ANNOTATION, TENURE_ANNOTATION, tenure_id};
pub use crate::lease::{
    ATTEMPT_ANNOTATION, JOB_REF_ANNOTATION, JOB_UID_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, annotation, holder,
};
pub use crate::limits::{SLOT_LABEL, SLOTS_MADE, SLOTS_RECORD, slot_name};
pub use crate::members::{
    HANDLERS_ANNOTATION, JOBS_ANNOTATION, MEMBER_LABEL, WATCH_LAG_ANNOTATION, member_lease_name, owner as member_owner,
};
pub use crate::ordering::{FIFO_BOUND, enqueue_sequence};
pub use crate::recurring::{
    RECURRING_LABEL, SCHEDULED_TIME_ANNOTATION, child as recurring_child, claim as recurring_claim, jitter_offset,
    job_name as recurring_job_name,
};
/// Marks the copy of a job that [`crate::jobs::list`] or [`crate::jobs::watch`] could not read (why); never on the
/// cluster.
pub use crate::unreadable::UNREADABLE_ANNOTATION;
