//! walhook: PostgreSQL logical replication (pgoutput) to entity events delivered as
//! signed webhooks. `main.rs` only wires these stages together.

pub mod backfill;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod delivery;
#[doc(hidden)]
pub mod fuzzing;
pub mod mapping;
pub mod pg;
pub mod routing;
pub mod server;
pub mod source;
pub mod store;
pub mod telemetry;
