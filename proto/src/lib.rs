//! Protobuf and gRPC types Ambit speaks on the wire, generated at build time from the `.proto`
//! files in this crate (`proto/<package path>/*.proto`).
//!
//! The modules mirror the protobuf packages, so a type's path says which package it is on the
//! wire: `istio.v1.auth.IstioCertificateRequest` is
//! [`istio::v1::auth::IstioCertificateRequest`]. Each package has its messages, a
//! `<service>_client` module (tonic client) and a `<service>_server` module (tonic server trait).
//!
//! | package | module | what |
//! |---|---|---|
//! | `istio.v1.auth` | [`istio::v1::auth`] | Istio's certificate signing API |
//! | `envoy.service.discovery.v3` | [`envoy::service::discovery::v3`] | xDS: ADS service, (delta) discovery requests and responses, `Resource` |
//! | `envoy.config.core.v3` | [`envoy::config::core::v3`] | `Node` (who asks), `Locality`, `ControlPlane` |
//! | `google.rpc` | [`google::rpc`] | `Status`, the reason carried by a NACK |
//! | `istio.workload` | [`istio::workload`] | `Address` = `Workload` or `Service`, pushed by istiod |
//! | `istio.security` | [`istio::security`] | `Authorization`, Istio's L4 policy |
//!
//! Every message implements [`prost::Name`], so `Address::type_url()` is the xDS type URL
//! (`type.googleapis.com/istio.workload.Address`) and [`prost_types::Any::from_msg`] /
//! [`prost_types::Any::to_msg`] pack and unpack resources.
//!
//! Unknown fields: decoding skips fields the `.proto` files do not declare, so a newer control
//! plane's additions are harmless. prost does not keep them, so a message decoded and encoded
//! again loses them; Ambit never re-encodes a resource it received (ACKs and NACKs carry only the
//! type URL, the nonce and the error), and nothing here should start doing so.
//!
//! Kept in its own crate so the agent does not rebuild generated code.

#![forbid(unsafe_code)]

/// Re-exported so users name the same versions the generated code was built against.
pub use prost;
pub use prost_types;

/// A module holding the generated code of one protobuf package (`$package`, as in
/// `$OUT_DIR/<package>.rs`). Generated code is not held to our lints.
macro_rules! generated {
    ($(#[$attr:meta])* $name:ident => $package:literal) => {
        $(#[$attr])*
        #[allow(
            clippy::all,
            clippy::pedantic,
            clippy::nursery,
            missing_docs,
            unreachable_pub,
            unused_qualifications,
            rustdoc::all
        )]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", $package, ".rs"));
        }
    };
}

pub mod envoy {
    pub mod service {
        pub mod discovery {
            generated! {
                /// Envoy's discovery protocol (`envoy/service/discovery/v3/{ads,discovery}.proto`):
                /// the `AggregatedDiscoveryService` (client and server) and its messages.
                v3 => "envoy.service.discovery.v3"
            }
        }
    }

    pub mod config {
        pub mod core {
            generated! {
                /// The parts of Envoy's core types xDS refers to (`envoy/config/core/v3/base.proto`).
                v3 => "envoy.config.core.v3"
            }
        }
    }
}

pub mod google {
    generated! {
        /// `google.rpc.Status` (`google/rpc/status.proto`), the error detail of an xDS NACK.
        rpc => "google.rpc"
    }
}

pub mod istio {
    pub mod v1 {
        generated! {
            /// Istio's certificate signing API (`istio/security/v1alpha1/ca.proto`), the API istiod
            /// serves on port 15012.
            auth => "istio.v1.auth"
        }
    }

    generated! {
        /// Istio's workload discovery types (`istio/workload/workload.proto`): the `Address`
        /// resources istiod pushes to ambient node agents.
        workload => "istio.workload"
    }

    generated! {
        /// Istio's L4 authorization policies for ambient node agents
        /// (`istio/security/authorization.proto`).
        security => "istio.security"
    }
}

#[cfg(test)]
mod tests {
    use super::envoy::config::core::v3::{Locality, Node};
    use super::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    };
    use super::google::rpc::Status;
    use super::istio::security::{
        self, Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
        string_match::MatchType,
    };
    use super::istio::workload::{
        Address, AppProtocol, GatewayAddress, LoadBalancing, NetworkAddress, NetworkMode, Port,
        PortList, Service, TunnelProtocol, Workload, WorkloadStatus, address, gateway_address,
        load_balancing,
    };
    use prost::{Message, Name};
    use std::collections::HashMap;

    fn workload() -> Workload {
        Workload {
            uid: "Kubernetes//Pod/default/client-0".into(),
            name: "client-0".into(),
            namespace: "default".into(),
            addresses: vec![vec![10, 0, 0, 7], vec![0xfd; 16]],
            network: "net1".into(),
            tunnel_protocol: TunnelProtocol::Hbone.into(),
            trust_domain: "cluster.local".into(),
            service_account: "client".into(),
            waypoint: Some(GatewayAddress {
                destination: Some(gateway_address::Destination::Address(NetworkAddress {
                    network: String::new(),
                    address: vec![10, 0, 0, 9],
                    length: None,
                })),
                hbone_mtls_port: 15008,
            }),
            node: "node-a".into(),
            services: HashMap::from([(
                "default/echo.default.svc.cluster.local".into(),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]),
            authorization_policies: vec!["default/allow-client".into()],
            status: WorkloadStatus::Unhealthy.into(),
            capacity: Some(3),
            ..Default::default()
        }
    }

    fn service() -> Service {
        Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 1],
                length: None,
            }],
            ports: vec![Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
            load_balancing: Some(LoadBalancing {
                routing_preference: vec![
                    load_balancing::Scope::Network.into(),
                    load_balancing::Scope::Zone.into(),
                ],
                mode: load_balancing::Mode::Failover.into(),
                ..Default::default()
            }),
            canonical: true,
            ..Default::default()
        }
    }

    fn authorization() -> Authorization {
        let exact = |s: &str| StringMatch {
            match_type: Some(MatchType::Exact(s.into())),
        };
        Authorization {
            name: "deny-client".into(),
            namespace: "default".into(),
            scope: Scope::Namespace.into(),
            action: Action::Deny.into(),
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        principals: vec![exact("cluster.local/ns/default/sa/client")],
                        not_namespaces: vec![StringMatch {
                            match_type: Some(MatchType::Presence(())),
                        }],
                        service_accounts: vec![ServiceAccountMatch {
                            namespace: "default".into(),
                            service_account: "client".into(),
                        }],
                        source_ips: vec![security::Address {
                            address: vec![10, 0, 0, 0],
                            length: 8,
                        }],
                        destination_ports: vec![8080, 9090],
                        not_destination_ports: vec![15021],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: true,
        }
    }

    /// Appends a field this crate does not declare (number 1000, length-delimited) to `buf`, as a
    /// newer control plane would send it.
    fn with_unknown_field(mut buf: Vec<u8>) -> Vec<u8> {
        prost::encoding::encode_key(1000, prost::encoding::WireType::LengthDelimited, &mut buf);
        prost::encoding::encode_varint(5, &mut buf);
        buf.extend_from_slice(b"extra");
        // And a varint one, number 999.
        prost::encoding::encode_key(999, prost::encoding::WireType::Varint, &mut buf);
        prost::encoding::encode_varint(42, &mut buf);
        buf
    }

    #[test]
    fn workload_round_trips_and_tolerates_unknown_fields() {
        let addr = Address {
            r#type: Some(address::Type::Workload(workload())),
        };
        let bytes = addr.encode_to_vec();
        assert_eq!(Address::decode(bytes.as_slice()).expect("decode"), addr);
        assert_eq!(
            Address::decode(with_unknown_field(bytes).as_slice()).expect("decode"),
            addr
        );
        // Unknown fields inside the nested message too.
        let inner = with_unknown_field(workload().encode_to_vec());
        assert_eq!(
            Workload::decode(inner.as_slice()).expect("decode"),
            workload()
        );
    }

    #[test]
    fn service_round_trips_and_tolerates_unknown_fields() {
        let addr = Address {
            r#type: Some(address::Type::Service(service())),
        };
        let bytes = addr.encode_to_vec();
        assert_eq!(Address::decode(bytes.as_slice()).expect("decode"), addr);
        assert_eq!(
            Address::decode(with_unknown_field(bytes).as_slice()).expect("decode"),
            addr
        );
    }

    #[test]
    fn authorization_round_trips_and_tolerates_unknown_fields() {
        let bytes = authorization().encode_to_vec();
        assert_eq!(
            Authorization::decode(bytes.as_slice()).expect("decode"),
            authorization()
        );
        let bytes = with_unknown_field(bytes);
        assert_eq!(
            Authorization::decode(bytes.as_slice()).expect("decode"),
            authorization()
        );
    }

    #[test]
    fn type_urls_are_the_ones_istiod_uses() {
        assert_eq!(
            Address::type_url(),
            "type.googleapis.com/istio.workload.Address"
        );
        assert_eq!(
            Authorization::type_url(),
            "type.googleapis.com/istio.security.Authorization"
        );
        let any = prost_types::Any::from_msg(&authorization()).expect("encode");
        assert_eq!(
            any.to_msg::<Authorization>().expect("decode"),
            authorization()
        );
    }

    #[test]
    fn delta_messages_round_trip() {
        let resource = Resource {
            name: "default/deny-client".into(),
            version: "v1".into(),
            resource: Some(prost_types::Any::from_msg(&authorization()).expect("encode")),
            ..Default::default()
        };
        let response = DeltaDiscoveryResponse {
            type_url: Authorization::type_url(),
            resources: vec![resource],
            removed_resources: vec!["default/old".into()],
            nonce: "n1".into(),
            ..Default::default()
        };
        let bytes = with_unknown_field(response.encode_to_vec());
        assert_eq!(
            DeltaDiscoveryResponse::decode(bytes.as_slice()).expect("decode"),
            response
        );

        let nack = DeltaDiscoveryRequest {
            node: Some(Node {
                id: "ztunnel~10.0.0.1~a.b~b.svc.cluster.local".into(),
                ..Default::default()
            }),
            type_url: Address::type_url(),
            response_nonce: "n1".into(),
            initial_resource_versions: HashMap::from([("a".into(), "v1".into())]),
            error_detail: Some(Status {
                code: 3,
                message: "bad".into(),
                details: vec![],
            }),
            ..Default::default()
        };
        let bytes = nack.encode_to_vec();
        assert_eq!(
            DeltaDiscoveryRequest::decode(bytes.as_slice()).expect("decode"),
            nack
        );
    }

    /// The key (tag) of field `number` with `wire_type`, as a protobuf encoder writes it.
    fn key(number: u32, wire_type: prost::encoding::WireType) -> Vec<u8> {
        let mut buf = Vec::new();
        prost::encoding::encode_key(number, wire_type, &mut buf);
        buf
    }

    /// Field numbers checked against hand-built encodings, so a wrong number in a `.proto` file
    /// fails here rather than as silently missing data from istiod.
    #[test]
    fn field_numbers_match_upstream() {
        use prost::encoding::WireType::{LengthDelimited as Len, Varint};

        // Workload.uid = 20: key (20 << 3 | 2) = 162 = varint [0xa2, 0x01].
        let w = Workload {
            uid: "u".into(),
            ..Default::default()
        };
        assert_eq!(
            w.encode_to_vec(),
            [vec![0xa2, 0x01, 1], b"u".to_vec()].concat()
        );

        // Hand-encoded Workload: hostname = 21, tunnel_protocol = 5 (HBONE = 1),
        // service_account = 7, status = 17 (UNHEALTHY = 1), network_mode = 25, capacity = 27.
        let mut buf = Vec::new();
        buf.extend(key(21, Len));
        buf.extend([1, b'h']);
        buf.extend(key(5, Varint));
        buf.push(1);
        buf.extend(key(7, Len));
        buf.extend([2, b's', b'a']);
        buf.extend(key(17, Varint));
        buf.push(1);
        buf.extend(key(25, Varint));
        buf.push(1);
        buf.extend(key(27, Len)); // UInt32Value { value = 1 }
        buf.extend([2, 0x08, 7]);
        let w = Workload::decode(buf.as_slice()).expect("decode");
        assert_eq!(w.hostname, "h");
        assert_eq!(w.tunnel_protocol(), TunnelProtocol::Hbone);
        assert_eq!(w.service_account, "sa");
        assert_eq!(w.status(), WorkloadStatus::Unhealthy);
        assert_eq!(w.network_mode(), NetworkMode::HostNetwork);
        assert_eq!(w.capacity, Some(7));

        // Address oneof: service = 2. NetworkAddress: network = 1, address = 2.
        let mut buf = key(2, Len);
        let mut svc = key(4, Len); // Service.addresses = 4
        let na = [
            key(1, Len),
            vec![1, b'n'],
            key(2, Len),
            vec![4, 10, 96, 0, 1],
        ]
        .concat();
        svc.push(na.len() as u8);
        svc.extend(na);
        buf.push(svc.len() as u8);
        buf.extend(svc);
        let Some(address::Type::Service(s)) =
            Address::decode(buf.as_slice()).expect("decode").r#type
        else {
            panic!("field 2 of Address must be the service");
        };
        assert_eq!(
            s.addresses,
            [NetworkAddress {
                network: "n".into(),
                address: vec![10, 96, 0, 1],
                length: None,
            }]
        );

        // Newer fields: NetworkAddress.length = 3 (a CIDR block), Port.app_protocol = 3
        // (GRPC = 3), Service.ingress_use_waypoint = 12, TunnelProtocol LEGACY_ISTIO_MTLS = 2.
        let na = NetworkAddress::decode(
            [key(2, Len), vec![4, 10, 50, 0, 0], key(3, Varint), vec![24]]
                .concat()
                .as_slice(),
        )
        .expect("decode");
        assert_eq!(na.length, Some(24));
        let p = Port::decode(
            [key(1, Varint), vec![80], key(3, Varint), vec![3]]
                .concat()
                .as_slice(),
        )
        .expect("decode");
        assert_eq!(p.app_protocol(), AppProtocol::Grpc);
        let s = Service::decode([key(12, Varint), vec![1]].concat().as_slice()).expect("decode");
        assert!(s.ingress_use_waypoint);
        let w = Workload::decode([key(5, Varint), vec![2]].concat().as_slice()).expect("decode");
        assert_eq!(w.tunnel_protocol(), TunnelProtocol::LegacyIstioMtls);

        // GatewayAddress.hbone_mtls_port = 3.
        let g = GatewayAddress::decode([key(3, Varint), vec![0x98, 0x75]].concat().as_slice())
            .expect("decode");
        assert_eq!(g.hbone_mtls_port, 15000);

        // Authorization: action = 4 (DENY = 1), rules = 5 -> Rule.clauses = 1 -> Clause.matches = 2
        // -> Match.not_destination_ports = 10 (packed), dry_run = 6.
        let m = [key(10, Len), vec![1, 80]].concat();
        let c = [key(2, Len), vec![m.len() as u8], m].concat();
        let r = [key(1, Len), vec![c.len() as u8], c].concat();
        let buf = [
            key(4, Varint),
            vec![1],
            key(5, Len),
            vec![r.len() as u8],
            r,
            key(6, Varint),
            vec![1],
        ]
        .concat();
        let a = Authorization::decode(buf.as_slice()).expect("decode");
        assert_eq!(a.action(), Action::Deny);
        assert!(a.dry_run);
        assert_eq!(a.rules[0].clauses[0].matches[0].not_destination_ports, [80]);

        // Match.service_accounts = 11; ServiceAccountMatch: namespace = 1, serviceAccount = 2.
        let sa = [key(1, Len), vec![2, b'n', b's'], key(2, Len), vec![1, b'x']].concat();
        let buf = [key(11, Len), vec![sa.len() as u8], sa].concat();
        let m = Match::decode(buf.as_slice()).expect("decode");
        assert_eq!(m.service_accounts[0].namespace, "ns");
        assert_eq!(m.service_accounts[0].service_account, "x");

        // DeltaDiscoveryRequest: response_nonce = 6, error_detail = 7 (Status.message = 2).
        let st = [key(2, Len), vec![1, b'e']].concat();
        let buf = [
            key(6, Len),
            vec![1, b'n'],
            key(7, Len),
            vec![st.len() as u8],
            st,
        ]
        .concat();
        let req = DeltaDiscoveryRequest::decode(buf.as_slice()).expect("decode");
        assert_eq!(req.response_nonce, "n");
        assert_eq!(req.error_detail.expect("error_detail").message, "e");

        // DeltaDiscoveryResponse: removed_resources = 6, nonce = 5; Resource: name = 3, version = 1.
        let res = [key(3, Len), vec![1, b'r'], key(1, Len), vec![1, b'1']].concat();
        let buf = [
            key(2, Len),
            vec![res.len() as u8],
            res,
            key(6, Len),
            vec![1, b'x'],
            key(5, Len),
            vec![1, b'n'],
        ]
        .concat();
        let resp = DeltaDiscoveryResponse::decode(buf.as_slice()).expect("decode");
        assert_eq!(
            (
                resp.resources[0].name.as_str(),
                resp.resources[0].version.as_str()
            ),
            ("r", "1")
        );
        assert_eq!(resp.removed_resources, ["x"]);
        assert_eq!(resp.nonce, "n");

        // Node: id = 1, cluster = 2, locality = 4 (Locality.zone = 2), client_features = 10.
        let node = Node {
            id: "i".into(),
            cluster: "c".into(),
            locality: Some(Locality {
                zone: "z".into(),
                ..Default::default()
            }),
            client_features: vec!["f".into()],
            ..Default::default()
        };
        let loc = [key(2, Len), vec![1, b'z']].concat();
        let expected = [
            key(1, Len),
            vec![1, b'i'],
            key(2, Len),
            vec![1, b'c'],
            key(4, Len),
            vec![loc.len() as u8],
            loc,
            key(10, Len),
            vec![1, b'f'],
        ]
        .concat();
        assert_eq!(node.encode_to_vec(), expected);
    }
}
