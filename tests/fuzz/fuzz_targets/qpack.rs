//! Fuzz target `qpack`; the property is `masque_relay_fuzz::qpack` (tests/fuzz/checks.rs).
#![no_main]

#[global_allocator]
static ALLOC: masque_relay_fuzz::CountingAlloc = masque_relay_fuzz::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| masque_relay_fuzz::qpack(data));
