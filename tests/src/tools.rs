//! Where the control plane's binaries are.

use std::path::PathBuf;

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The path of a tool that `make tools` built (kube-apiserver, etcd, kubectl, helm).
///
/// They live in `$FERRY_TOOLS/bin`, by default `~/.cache/ferry/tools/bin`, the same
/// place tests/tools/build.sh writes them.
pub fn tool(name: &str) -> PathBuf {
    tools_dir().join("bin").join(name)
}

/// `$FERRY_TOOLS`, by default `~/.cache/ferry/tools` (also the CNI plugins, `cni/bin`,
/// and the pause image, `images/`, of the real nodes).
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("FERRY_TOOLS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/ferry/tools"),
    }
}
