//! The one integration-test binary: every module below is a group of tests sharing the
//! harness in `support` (a throwaway PostgreSQL cluster, bounded waits).

mod support;

mod cli_check;
mod cli_tail;
mod daemon;
mod delivery;
mod ha;
mod harness_smoke;
mod reload;
mod source;
