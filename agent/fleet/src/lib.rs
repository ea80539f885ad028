//! The library the spot agent and the game-server wrapper share, without a Kubernetes client:
//! the EC2 instance-metadata client ([`imds`]), the spot notices it and EventBridge carry
//! ([`notice`], [`eventbridge`]: pure parsers, fuzzed), the inventory message schema and its
//! SQS publisher ([`inventory`]), the one retry backoff ([`backoff`]) and an injectable
//! [`clock`].

pub mod backoff;
pub mod clock;
pub mod eventbridge;
pub mod imds;
pub mod inventory;
pub mod notice;

/// Installs ring as the process's rustls crypto provider, once: the HTTP clients (metadata,
/// webhook) take the process default, and ring is the workspace's one provider.
pub fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first; that one serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
