//! The multipliers of the programs' hashes: odd constants whose bits are well mixed,
//! each taken from a published hash and named after it, so that none is a number to
//! guess at. Multiplying by one moves every bit of the input into the product's top
//! bits, which is where each hash takes its set from.

/// 2^64 / φ, the multiplier of Fibonacci hashing.
pub const GOLDEN_64: u64 = 0x9e37_79b9_7f4a_7c15;
/// xxHash64's second and third primes.
pub const XXH64_PRIME_2: u64 = 0xc2b2_ae3d_27d4_eb4f;
pub const XXH64_PRIME_3: u64 = 0x1656_67b1_9e37_79f9;
/// xxHash32's first prime (close to 2^32 / φ).
pub const XXH32_PRIME_1: u32 = 0x9e37_79b1;
/// The two multipliers of `MurmurHash3`'s 32-bit finaliser.
pub const MURMUR3_FMIX_1: u32 = 0x85eb_ca6b;
pub const MURMUR3_FMIX_2: u32 = 0xc2b2_ae35;
