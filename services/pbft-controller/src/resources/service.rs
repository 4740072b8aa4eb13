//! The two Services: a headless one that gives every pod a stable DNS name (how replicas find
//! each other), and a ClusterIP one for clients and scrapers.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{CLIENT_TCP_PORT, Cluster, HTTP_PORT, REPLICA_PORT};
use crate::crd::Transport;

fn port(name: &str, number: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port: number,
        target_port: Some(IntOrString::Int(number)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// `<name>-headless`: publishes not-ready addresses, because a replica only becomes ready
/// once it reaches its peers, and it reaches them by these very names.
pub fn headless(c: &Cluster) -> Service {
    Service {
        metadata: c.meta(c.headless_name()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(c.selector_labels()),
            ports: Some(vec![port("replica", REPLICA_PORT), port("http", HTTP_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The client port: the gRPC client API shares the replica port, except under the TCP
/// transport where it has its own.
pub fn client_port(transport: Transport) -> i32 {
    match transport {
        Transport::Grpc => REPLICA_PORT,
        Transport::Tcp => CLIENT_TCP_PORT,
    }
}

/// `<name>`: ClusterIP Service for clients (`client`) and the sidecar (`http`). Only ready
/// replicas receive traffic.
pub fn client(c: &Cluster) -> Service {
    Service {
        metadata: c.meta(c.name.clone()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(c.selector_labels()),
            ports: Some(vec![
                port("client", client_port(c.spec.transport)),
                port("http", HTTP_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PbftClusterSpec;
    use crate::resources::test_support::cluster;

    fn ports(s: &Service) -> Vec<(String, i32)> {
        s.spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.port))
            .collect()
    }

    #[test]
    fn headless_publishes_not_ready_pods() {
        let pc = cluster("c1", PbftClusterSpec::default());
        let c = Cluster::new(&pc, 4, "cluster.local").unwrap();
        let s = headless(&c);
        assert_eq!(s.metadata.name.as_deref(), Some("c1-headless"));
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector.as_ref().unwrap(), &c.selector_labels());
        assert_eq!(
            ports(&s),
            [("replica".to_owned(), 7000), ("http".to_owned(), 8000)]
        );
        assert_eq!(s.metadata.owner_references.unwrap()[0].uid, "uid-c1");
    }

    #[test]
    fn client_port_follows_the_transport() {
        let pc = cluster("c1", PbftClusterSpec::default());
        let c = Cluster::new(&pc, 4, "cluster.local").unwrap();
        let s = client(&c);
        assert_eq!(s.metadata.name.as_deref(), Some("c1"));
        assert_eq!(s.spec.as_ref().unwrap().type_.as_deref(), Some("ClusterIP"));
        assert_eq!(s.spec.as_ref().unwrap().publish_not_ready_addresses, None);
        assert_eq!(
            ports(&s),
            [("client".to_owned(), 7000), ("http".to_owned(), 8000)]
        );

        let pc = cluster(
            "c1",
            PbftClusterSpec {
                transport: Transport::Tcp,
                ..PbftClusterSpec::default()
            },
        );
        let c = Cluster::new(&pc, 4, "cluster.local").unwrap();
        assert_eq!(
            ports(&client(&c)),
            [("client".to_owned(), 7001), ("http".to_owned(), 8000)]
        );
        // Replicas talk to each other on 7000 whatever the client port.
        assert_eq!(ports(&headless(&c))[0].1, 7000);
    }
}
