//! Fuzzes every L402 parser: WWW-Authenticate challenges, Authorization credentials, macaroon binaries.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    automaton_l402::fuzzing::parse_everything(data);
});
