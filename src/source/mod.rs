//! The source stage: a PostgreSQL logical replication client, the pgoutput decoder and
//! the conversion of column values to JSON.

pub mod client;
pub mod decoder;
mod error;
pub mod lsn;
pub mod pgoutput;
pub mod publication;
pub mod setup;
pub mod stream;
pub mod values;

pub use error::SourceError;
pub use lsn::Lsn;
