//! The committed CRD files are exactly what the code generates (the same check CI runs with
//! `crdgen --check`), and the YAML means the same as the CRD object.

use std::path::PathBuf;

use kube::CustomResourceExt;
use pbft_controller::crd::{PbftCluster, crd_yaml};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn committed_crds_are_fresh() {
    let generated = crd_yaml().unwrap();
    for path in [
        "deploy/helm/pbft/crds/pbftcluster.yaml",
        "deploy/k8s/crd.yaml",
    ] {
        let committed = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| {
            panic!("{path}: {e}; run: cargo run -p pbft-controller --bin crdgen -- --write")
        });
        assert!(
            committed == generated,
            "{path} is stale; run: cargo run -p pbft-controller --bin crdgen -- --write"
        );
    }
}

#[test]
fn yaml_round_trips_to_the_crd() {
    let yaml = crd_yaml().unwrap();
    let parsed: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
    let expected = serde_json::to_value(PbftCluster::crd()).unwrap();
    assert_eq!(parsed, expected);
}

#[test]
fn check_mode_catches_a_stale_file() {
    let dir = std::env::temp_dir().join(format!("crdgen-test-{}", std::process::id()));
    let bin = env!("CARGO_BIN_EXE_crdgen");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .arg("--root")
            .arg(&dir)
            .output()
            .unwrap()
    };
    let missing = run(&["--check"]);
    assert!(!missing.status.success());
    assert!(run(&["--write"]).status.success());
    assert!(run(&["--check"]).status.success());
    let file = dir.join("deploy/k8s/crd.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("pbftclusters", "pbftclusterz")).unwrap();
    let stale = run(&["--check"]);
    assert!(!stale.status.success());
    let err = String::from_utf8_lossy(&stale.stderr);
    assert!(
        err.contains("deploy/k8s/crd.yaml") && err.contains("--write"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
