//! Embeds the default model bundle (models/synthetic-shapes: the small TCL our trainer learns in the synthetic world,
//! 13 MB) into the binary, so `tclseg segment` has a model that segments something on a fresh machine before any
//! bundle is exported. The bundle's own hashes are checked when it is unpacked and opened, like any other bundle.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new("models/synthetic-shapes");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut code = String::from("/// (file name, contents) of the built-in model bundle.\npub const FILES: &[(&str, &[u8])] = &[\n");
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            let path = std::fs::canonicalize(dir.join(&name)).expect("canonical fixture path");
            println!("cargo:rerun-if-changed={}", path.display());
            let _ = writeln!(
                code,
                "    ({name:?}, include_bytes!({:?})),",
                path.display().to_string()
            );
        }
    }
    code.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR set by cargo"))
        .join("builtin_model.rs");
    std::fs::write(out, code).expect("write builtin_model.rs");
}
