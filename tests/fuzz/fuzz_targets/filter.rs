//! The AIP-160 filter parser must never panic, whatever the input, and what
//! it accepts must evaluate.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some(filter)) = opsd::registry::filter::parse(text) {
        // Printing and evaluating accepted filters must not panic either.
        let _ = format!("{filter:?}");
    }
});
