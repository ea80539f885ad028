//! Replica discovery sources. Each one publishes complete sets into a
//! [`ReplicaSet`](crate::replicas::ReplicaSet), the data plane's only view of replicas.

pub mod agones;
pub mod endpoints;
pub mod games;
pub mod kubernetes;
