//! Replica discovery sources. Each one publishes complete sets into a
//! [`ReplicaSet`](crate::replicas::ReplicaSet), the data plane's only view of replicas.

pub mod endpoints;
pub mod kubernetes;
