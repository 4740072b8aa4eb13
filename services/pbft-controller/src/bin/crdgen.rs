//! `crdgen`: prints the PbftCluster CRD as YAML; `--write` updates the committed copies,
//! `--check` fails when they differ from the code (CI runs it, so the chart never ships a
//! stale schema).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

/// Where the committed CRD lives, relative to the workspace root.
const TARGETS: [&str; 2] = [
    "deploy/helm/pbft/crds/pbftcluster.yaml",
    "deploy/k8s/crd.yaml",
];

#[derive(Parser, Debug)]
#[command(about = "Print, write or check the PbftCluster CRD YAML")]
struct Cli {
    /// Write the committed CRD files.
    #[arg(long, conflicts_with = "check")]
    write: bool,
    /// Exit non-zero if a committed CRD file differs from the generated one.
    #[arg(long)]
    check: bool,
    /// Workspace root (default: two levels above this crate).
    #[arg(long)]
    root: Option<PathBuf>,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    let yaml = pbft_controller::crd::crd_yaml()?;
    let root = cli
        .root
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    if cli.write {
        for t in TARGETS {
            let path = root.join(t);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&path, &yaml).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {t}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if cli.check {
        let stale: Vec<&str> = TARGETS
            .into_iter()
            .filter(|t| std::fs::read_to_string(root.join(t)).ok().as_deref() != Some(&yaml))
            .collect();
        if stale.is_empty() {
            println!("CRD files are up to date");
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!(
            "CRD out of date (missing or differs from the code): {}\nrun: cargo run -p pbft-controller --bin crdgen -- --write",
            stale.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    print!("{yaml}");
    Ok(ExitCode::SUCCESS)
}
