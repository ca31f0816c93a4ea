//! The routing stage: which subscriptions an entity event is due to, and the
//! [`Envelope`] it is delivered as.

pub(crate) mod envelope;
mod router;

pub use envelope::{Envelope, EventSource};
pub use router::{Router, Routes};
