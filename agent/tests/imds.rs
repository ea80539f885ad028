//! The instance-metadata client against a faithful fake: tokens, refresh, 401, IMDSv1
//! fallback, retries, unreachable metadata, and the documented notice bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spotable_fixtures::imds::FakeImds;
use spotable_fleet::clock::Clock;
use spotable_fleet::imds::{Imds, ImdsConfig, ImdsError, SpotAction, Version};

fn client(fake: &FakeImds, ttl: Duration) -> Imds {
    Imds::new(ImdsConfig {
        endpoint: fake.endpoint(),
        token_ttl: ttl,
        timeout: Duration::from_millis(500),
        attempts: 3,
    })
    .unwrap()
}

const SPOT: &str = "meta-data/spot/instance-action";

#[tokio::test]
async fn uses_one_token_for_many_requests() {
    let fake = FakeImds::start().await.unwrap();
    fake.set("meta-data/instance-id", "i-0123");
    let imds = client(&fake, Duration::from_secs(21_600));
    for _ in 0..5 {
        assert_eq!(
            imds.get("meta-data/instance-id").await.unwrap().as_deref(),
            Some("i-0123")
        );
    }
    assert_eq!(fake.token_requests(), 1);
    assert_eq!(fake.gets(), (0, 5));
    assert_eq!(imds.last_version(), Some(Version::V2));
}

#[tokio::test]
async fn refreshes_the_token_before_it_expires() {
    let fake = FakeImds::start().await.unwrap();
    fake.set("meta-data/instance-id", "i-0123");
    fake.set_v2_required(true);
    // Six hours of token life in simulated time: the client's clock is the test's.
    let t0 = Instant::now();
    let elapsed = Arc::new(Mutex::new(Duration::ZERO));
    let clock = Clock::from_fn({
        let elapsed = elapsed.clone();
        move || t0 + *elapsed.lock().unwrap()
    });
    let imds = client(&fake, Duration::from_secs(21_600)).with_clock(clock);
    imds.get("meta-data/instance-id").await.unwrap();
    // Refresh when a minute of the lifetime is left (a quarter, at most a minute early).
    *elapsed.lock().unwrap() = Duration::from_secs(21_600 - 61);
    imds.get("meta-data/instance-id").await.unwrap();
    assert_eq!(
        fake.token_requests(),
        1,
        "still fresh a minute and a second before"
    );
    *elapsed.lock().unwrap() = Duration::from_secs(21_600 - 59);
    imds.get("meta-data/instance-id").await.unwrap();
    assert_eq!(fake.token_requests(), 2, "renewed within the last minute");
    assert_eq!(fake.unauthorized(), 0, "never used an expired token");
}

#[tokio::test]
async fn a_401_fetches_a_new_token_and_retries() {
    let fake = FakeImds::start().await.unwrap();
    fake.set("meta-data/instance-id", "i-0123");
    fake.set_v2_required(true);
    let imds = client(&fake, Duration::from_secs(21_600));
    imds.get("meta-data/instance-id").await.unwrap();
    fake.revoke_tokens();
    assert_eq!(
        imds.get("meta-data/instance-id").await.unwrap().as_deref(),
        Some("i-0123")
    );
    assert_eq!(fake.unauthorized(), 1);
    assert_eq!(fake.token_requests(), 2);
}

#[tokio::test]
async fn falls_back_to_imdsv1_when_no_token_can_be_had() {
    let fake = FakeImds::start().await.unwrap();
    fake.set("meta-data/instance-id", "i-0123");
    fake.set_v2_available(false);
    let imds = client(&fake, Duration::from_secs(21_600));
    assert_eq!(
        imds.get("meta-data/instance-id").await.unwrap().as_deref(),
        Some("i-0123")
    );
    assert_eq!(imds.last_version(), Some(Version::V1));
    assert_eq!(fake.gets(), (1, 0));
}

#[tokio::test]
async fn server_errors_are_retried() {
    let fake = FakeImds::start().await.unwrap();
    fake.set("meta-data/instance-id", "i-0123");
    let imds = client(&fake, Duration::from_secs(21_600));
    imds.get("meta-data/instance-id").await.unwrap();
    fake.fail_next(2);
    assert_eq!(
        imds.get("meta-data/instance-id").await.unwrap().as_deref(),
        Some("i-0123")
    );
}

#[tokio::test]
async fn unreachable_metadata_is_an_error_not_a_hang() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let imds = Imds::new(ImdsConfig {
        endpoint: format!("http://127.0.0.1:{port}"),
        token_ttl: Duration::from_secs(60),
        timeout: Duration::from_millis(300),
        attempts: 2,
    })
    .unwrap();
    let start = Instant::now();
    let err = imds.spot_action().await.unwrap_err();
    assert!(matches!(err, ImdsError::Unreachable { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn notices_as_documented() {
    let fake = FakeImds::start().await.unwrap();
    let imds = client(&fake, Duration::from_secs(21_600));
    assert_eq!(imds.spot_action().await.unwrap(), None, "404: no notice");
    assert_eq!(imds.rebalance().await.unwrap(), None);
    assert_eq!(imds.scheduled_events().await.unwrap(), vec![]);

    fake.set(
        SPOT,
        r#"{"action": "terminate", "time": "2026-11-24T08:22:00Z"}"#,
    );
    assert_eq!(
        imds.spot_action().await.unwrap(),
        Some(SpotAction {
            action: "terminate".into(),
            time: "2026-11-24T08:22:00Z".into()
        })
    );
    fake.set(
        "meta-data/events/recommendations/rebalance",
        r#"{"noticeTime": "2026-11-24T08:20:00Z"}"#,
    );
    assert_eq!(
        imds.rebalance().await.unwrap().unwrap().notice_time,
        "2026-11-24T08:20:00Z"
    );
    fake.set(
        "meta-data/events/maintenance/scheduled",
        r#"[{"NotBefore": "21 Jan 2019 09:00:43 GMT", "Code": "system-reboot",
             "Description": "scheduled reboot", "EventId": "instance-event-0d59937288b749b32",
             "NotAfter": "21 Jan 2019 09:17:23 GMT", "State": "active"},
            {"NotBefore": "1 Jan 2019 09:00:43 GMT", "Code": "instance-stop", "Description": "",
             "EventId": "instance-event-0000", "State": "completed"}]"#,
    );
    let events = imds.scheduled_events().await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_id, "instance-event-0d59937288b749b32");

    fake.set(SPOT, "{not json");
    assert!(matches!(
        imds.spot_action().await,
        Err(ImdsError::Parse { .. })
    ));

    fake.set_identity(
        "i-0abc",
        "eu-west-1",
        "ec2-1-2-3-4.compute.amazonaws.com",
        "1.2.3.4",
    );
    let id = imds.identity().await.unwrap();
    assert_eq!(id.instance_id.as_deref(), Some("i-0abc"));
    assert_eq!(id.region.as_deref(), Some("eu-west-1"));
    assert_eq!(id.public_ipv4.as_deref(), Some("1.2.3.4"));
}
