//! `ORG/NAME` model ids resolved offline from the local Hugging Face hub cache:
//! `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; the snapshot that
//! `models--ORG--NAME/refs/main` names (or the only snapshot there is).

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// Where the hub cache is, by the environment's rules.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Whether `spec` reads as a hub id (`ORG/NAME`) rather than a path.
pub fn is_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(org) && ok(name)
}

/// `path` itself when it exists or is no hub id; else the cached snapshot of that id: its
/// folder, or its one `.gguf` file when the snapshot holds GGUF files and no `config.json`.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let spec = path.to_string_lossy();
    if path.exists() || !is_hub_id(&spec) {
        return Ok(path.to_path_buf());
    }
    let Some(cache) = cache_dir() else {
        return Err(ModelError::Config(format!(
            "{spec}: no such file, and no Hugging Face cache to look in (set HF_HOME)"
        )));
    };
    let repo = cache.join(format!("models--{}", spec.replace('/', "--")));
    let not_found = || {
        ModelError::Config(format!(
            "{spec}: not a file, and not in the Hugging Face cache (looked in {}; fedllm never downloads)",
            repo.display()
        ))
    };
    let snapshots = repo.join("snapshots");
    let rev = match std::fs::read_to_string(repo.join("refs/main")) {
        Ok(r) => r.trim().to_string(),
        Err(_) => {
            let revs: Vec<String> = std::fs::read_dir(&snapshots)
                .map_err(|_| not_found())?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            match revs.as_slice() {
                [one] => one.clone(),
                [] => return Err(not_found()),
                _ => {
                    return Err(ModelError::Config(format!(
                        "{spec}: {} has no refs/main and {} snapshots; give the snapshot folder",
                        repo.display(),
                        revs.len()
                    )))
                }
            }
        }
    };
    let snap = snapshots.join(&rev);
    if !snap.is_dir() {
        return Err(ModelError::Config(format!(
            "{spec}: refs/main names snapshot {rev}, which is not in {}",
            snapshots.display()
        )));
    }
    if snap.join("config.json").exists() {
        return Ok(snap);
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(&snap)
        .map_err(|e| ModelError::io(&snap, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ModelError::Config(format!(
            "{spec}: snapshot {} holds neither config.json nor a .gguf file",
            snap.display()
        ))),
        _ => Err(ModelError::Config(format!(
            "{spec}: snapshot {} holds {} .gguf files; give one of them as the path",
            snap.display(),
            ggufs.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths() {
        assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!is_hub_id("models/x.gguf/extra"));
        assert!(!is_hub_id("./model"));
        assert!(!is_hub_id("/abs"));
        assert!(!is_hub_id("model.gguf"));
    }
}
