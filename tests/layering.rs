//! The library's floors, checked from the source: a module may name (`crate::x`) only modules on a lower floor, or
//! itself. The floors are the ones ARCHITECTURE.md states; a new top-level module must be given one here, and an
//! import that climbs (or goes sideways) fails this test with the file and line.

use std::path::{Path, PathBuf};

/// Top-level library modules by floor, lowest first.
const FLOORS: &[&[&str]] = &[
    &["telemetry", "gst", "trainer", "shard"],
    &["model"],
    &["queries", "source"],
    &["sink", "events"],
    &["config"],
    &["pipeline", "segment", "eval", "bench"],
    &["daemon"],
];

fn floor_of(module: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to; None for the binary's own files and lib.rs.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    let name = first.trim_end_matches(".rs").to_string();
    match name.as_str() {
        "main" | "lib" | "cli" | "commands" => None,
        _ => Some(name),
    }
}

#[test]
fn imports_run_downward_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    let mut unplaced = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(floor) = floor_of(&module) else {
            unplaced.push(module);
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        for (n, line) in text.lines().enumerate() {
            for (i, _) in line.match_indices("crate::") {
                let target: String = line[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if target == module || target.is_empty() {
                    continue;
                }
                match floor_of(&target) {
                    Some(f) if f < floor => {}
                    Some(f) => problems.push(format!(
                        "{}:{}: {module} (floor {floor}) names {target} (floor {f})",
                        file.strip_prefix(&src).expect("under src").display(),
                        n + 1
                    )),
                    None => unplaced.push(target),
                }
            }
        }
    }
    unplaced.sort();
    unplaced.dedup();
    assert!(
        unplaced.is_empty(),
        "modules without a floor in tests/layering.rs: {unplaced:?}"
    );
    assert!(
        problems.is_empty(),
        "imports that do not run downward:\n{}",
        problems.join("\n")
    );
}
