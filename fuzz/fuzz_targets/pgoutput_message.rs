//! One pgoutput message from arbitrary bytes: parse, then decode in a session that
//! announced the corpus's `users` table. Body: `walhook::fuzzing::pgoutput_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    walhook::fuzzing::pgoutput_message(data);
});
