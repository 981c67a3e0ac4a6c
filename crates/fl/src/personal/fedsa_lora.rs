//! FedSA-LoRA (Guo et al. 2024): A matrices learn what clients share and are averaged; B
//! matrices learn what is client-specific and never leave their client.

/// B stays on the client.
pub fn kept() -> Vec<String> {
    vec!["*lora_B*".to_string()]
}
