//! FFA-LoRA (Sun et al. 2024): A is drawn from the run seed every party shares and frozen, so
//! only B is trained and sent (half of LoRA's bytes) and averaging B is exact:
//! Σ pₖ·BₖA = (Σ pₖBₖ)·A.

/// A is frozen everywhere (and, being the same seeded values everywhere, never travels).
pub fn frozen() -> Vec<String> {
    vec!["*lora_A*".to_string()]
}
