//! See `opsd::fuzz::client_bytes`: whatever the bytes, it returns, and a refusal
//! has the right code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| opsd::fuzz::client_bytes(data));
