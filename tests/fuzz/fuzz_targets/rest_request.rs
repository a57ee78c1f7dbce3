//! See `opsd::fuzz::rest_request`: whatever the bytes, it returns, and a refusal
//! has the right code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| opsd::fuzz::rest_request(data));
