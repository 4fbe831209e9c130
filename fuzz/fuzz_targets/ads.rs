//! libFuzzer entry point; the target itself is [`ambit_fuzz::ads`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ambit_fuzz::ads(data));
