//! Writes the CRD template into the chart (or to stdout with `--stdout`).
//!
//! Run from the repository root: `cargo run -p ferry-crds --bin crdgen`.

fn main() -> std::io::Result<()> {
    let yaml = ferry_crds::crd_template();
    if std::env::args().any(|a| a == "--stdout") {
        print!("{yaml}");
        return Ok(());
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(ferry_crds::CRD_TEMPLATE_PATH);
    std::fs::write(&path, yaml)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
