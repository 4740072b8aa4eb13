//! The PodDisruptionBudget: voluntary disruptions (drains, upgrades) may take down at most
//! `f` replicas at once, so the remaining `2f + 1` always form a quorum.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Cluster;

/// `<name>`: `maxUnavailable = f = (n - 1) / 3`.
pub fn build(c: &Cluster) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: c.meta(c.name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(c.faults())),
            selector: Some(LabelSelector {
                match_labels: Some(c.selector_labels()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PbftClusterSpec;
    use crate::resources::test_support::cluster;

    #[test]
    fn max_unavailable_is_f() {
        let pc = cluster("c1", PbftClusterSpec::default());
        for (n, f) in [(4, 1), (7, 2), (10, 3)] {
            let c = Cluster::new(&pc, n, "cluster.local").unwrap();
            let pdb = build(&c);
            let spec = pdb.spec.unwrap();
            assert_eq!(spec.max_unavailable, Some(IntOrString::Int(f)), "n={n}");
            assert_eq!(spec.min_available, None);
            assert_eq!(
                spec.selector.unwrap().match_labels.unwrap(),
                c.selector_labels()
            );
            assert_eq!(pdb.metadata.name.as_deref(), Some("c1"));
            assert_eq!(
                pdb.metadata.owner_references.unwrap()[0].kind,
                "PbftCluster"
            );
        }
    }
}
