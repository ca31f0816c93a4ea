//! A replication session: length-prefixed pgoutput messages through one decoder, so
//! mutations of real streams reach the relation and type caches. Body:
//! `walhook::fuzzing::pgoutput_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    walhook::fuzzing::pgoutput_stream(data);
});
