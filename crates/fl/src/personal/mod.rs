//! Personalised FL on adapters: what each method keeps on the client, freezes, or trains
//! apart. The server side of a method is a name-pattern policy (what never travels) and, for
//! pFedMe, a strategy; the client side is one file per method. Personal adapters (Ditto's p,
//! pFedMe's θ) live in the client's state under `personal/` names, so they are checkpointed,
//! spilled to disk and kept across a distributed client's restarts like any own tensor.

use crate::config::{PersonalCfg, PersonalMethod};
use crate::params::ParamSet;

pub mod ditto;
pub mod fedrep;
pub mod fedsa_lora;
pub mod ffa_lora;
pub mod pfedme;

/// The prefix of a personal adapter's tensors in a client's state.
pub const PERSONAL: &str = "personal/";

/// Name patterns the server never sends nor aggregates under this method (beyond
/// `federate.local_tensors`).
pub fn kept(cfg: &PersonalCfg) -> Vec<String> {
    match cfg.method {
        PersonalMethod::Fedrep => cfg.head.clone(),
        PersonalMethod::FedsaLora => fedsa_lora::kept(),
        PersonalMethod::FfaLora => ffa_lora::frozen(),
        _ => Vec::new(),
    }
}

/// Name patterns no client trains under this method.
pub fn frozen(cfg: &PersonalCfg) -> Vec<String> {
    match cfg.method {
        PersonalMethod::FfaLora => ffa_lora::frozen(),
        _ => Vec::new(),
    }
}

/// The personal adapter stored in `state`, if the client has one (names without the prefix).
pub fn personal_set(state: &ParamSet) -> Option<ParamSet> {
    let p: ParamSet = state
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(PERSONAL)?.to_string(), v.clone())))
        .collect();
    (!p.is_empty()).then_some(p)
}

/// Stores `p` as the client's personal adapter.
pub fn store_personal(state: &mut ParamSet, p: ParamSet) {
    for (k, v) in p {
        state.insert(format!("{PERSONAL}{k}"), v);
    }
}

/// The parameters a client uses: its personal adapter where it has one, else `full` (the
/// global tensors completed by its own).
pub fn own_params(full: ParamSet, state: &ParamSet) -> ParamSet {
    match personal_set(state) {
        Some(mut p) => {
            for (k, v) in full {
                p.entry(k).or_insert(v);
            }
            p
        }
        None => full,
    }
}
