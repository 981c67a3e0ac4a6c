//! Arbitrary bytes as a stream of length-delimited frames into the update decoder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fedllm_transport::wire::fuzz_decode(data);
});
