//! The container image's build context, reproduced without Docker (these
//! machines have no engine): the files the Dockerfile's build stage copies,
//! laid out as it lays them out, must be a project cargo accepts. The first
//! Dockerfile left out the benches the manifest names, and its build
//! stopped at once with "can't find `micro` bench".

use std::path::{Path, PathBuf};
use std::process::Command;

/// `(sources, destination)` of each COPY of the build stage (the first
/// stage; `--from` copies belong to later ones).
fn build_stage_copies(dockerfile: &str) -> Vec<(Vec<String>, String)> {
    let mut copies = Vec::new();
    let mut stages = 0;
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages += 1;
        }
        if stages == 1 && line.starts_with("COPY ") && !line.contains("--from") {
            let mut words: Vec<String> =
                line.split_whitespace().skip(1).map(str::to_owned).collect();
            let dest = words.pop().expect("a destination");
            copies.push((words, dest));
        }
    }
    copies
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn the_images_build_context_is_a_project_cargo_accepts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copies = build_stage_copies(&dockerfile);
    assert!(!copies.is_empty(), "no COPY in the build stage");
    let context: PathBuf =
        std::env::temp_dir().join(format!("rl-image-context-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&context);
    for (sources, dest) in &copies {
        for source in sources {
            let from = root.join(source);
            assert!(
                from.exists(),
                "the Dockerfile copies {source}, which does not exist"
            );
            let to = if dest.ends_with('/') {
                context.join(dest.trim_start_matches("./")).join(source)
            } else {
                context.join(dest.trim_start_matches("./"))
            };
            copy_tree(&from, &to);
        }
    }
    // The build's first step: read the manifest (every target it names must
    // be there) and check the lock file. Offline: a package this machine
    // never downloaded is not the context's fault, so that one refusal is
    // let through; a manifest or lock-file refusal is not.
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["fetch", "--locked", "--offline"])
        .current_dir(&context)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&context);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let only_offline = !out.status.success()
        && stderr.contains("offline")
        && !stderr.contains("failed to parse manifest")
        && !stderr.contains("lock file");
    assert!(
        out.status.success() || only_offline,
        "cargo refuses the image's build context:\n{stderr}"
    );
}
