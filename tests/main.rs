//! The one integration-test binary: every module below is a group of tests sharing the
//! harness in `support` (a throwaway PostgreSQL cluster, bounded waits).

mod support;

mod aggregate;
mod backfill;
mod bench_smoke;
mod chaos;
mod cli_check;
mod cli_reference;
mod cli_tail;
mod config_docs;
mod connect;
mod context;
mod daemon;
mod delivery;
mod demo;
mod durability;
mod errors;
mod ha;
mod harness_smoke;
mod ingest;
mod least_privilege;
mod lifecycle;
mod operator;
mod payload_schema;
mod recovery;
mod reload;
mod server;
mod source;
