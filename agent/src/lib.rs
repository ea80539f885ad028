//! Spotable's spot agent, and the library it shares with the game-server wrapper.
//!
//! Shared (always built): [`imds`], the EC2 instance-metadata client, and [`inventory`], the
//! inventory message schema and its SQS publisher. With the default `kubernetes` feature: the
//! agent's interruption handling (cordon, taint, evict).

#[cfg(feature = "kubernetes")]
pub mod agent;
#[cfg(feature = "kubernetes")]
pub mod cli;
#[cfg(feature = "kubernetes")]
pub mod drain;
pub mod eventbridge;
pub mod imds;
pub mod inventory;
#[cfg(feature = "kubernetes")]
pub mod metrics;
pub mod notice;
#[cfg(feature = "kubernetes")]
pub mod queue;
#[cfg(feature = "kubernetes")]
pub mod respond;
#[cfg(feature = "testing")]
pub mod testing;

/// Installs ring as the process's rustls crypto provider, once: the HTTP clients (metadata,
/// webhook) take the process default, and ring is the workspace's one provider.
pub fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first; that one serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
