//! Config loading (TOML parse, env overrides and `${VAR}` expansion with a fixed
//! environment, validation) from arbitrary text. Body: `walhook::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: walhook::fuzzing::allow_caught_third_party_panics(),
    |data: &[u8]| {
        walhook::fuzzing::config(data);
    }
);
