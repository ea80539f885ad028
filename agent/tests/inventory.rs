//! Inventory messages through the real aws-sdk-sqs client to the SQS emulator (moto).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use spotable_fixtures::aws::{Moto, create_queue, moto_with_queue, receive_all, sqs_client_for};
use spotable_fleet::inventory::{Message, PodRef, Port, Proto, Publisher, Status};

/// A queue message as a consumer reads it: held against the published schema, then typed.
fn parse(body: &str) -> Message {
    let value = spotable_fixtures::schema::inventory_message(body).unwrap();
    serde_json::from_value(value).unwrap()
}

fn message(id: &str) -> Message {
    let mut m = Message::new(id, Status::Ready);
    m.kind = Some("minecraft".into());
    m.pod = Some(PodRef {
        namespace: "games".into(),
        name: "mc-0".into(),
        uid: Some("uid-1".into()),
    });
    m.ports.insert(
        "game".into(),
        Port {
            port: 7777,
            proto: Proto::Udp,
        },
    );
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_messages_carry_group_and_dedup_ids_and_are_delivered_once() {
    let (_moto, client, url) = moto_with_queue("inventory.fifo").await;
    let publisher = Publisher::with_client(client.clone(), url.clone());
    publisher.send(&message("mc-0:ready:1")).await.unwrap();
    // A retried send of the same event is deduplicated by SQS.
    publisher.send(&message("mc-0:ready:1")).await.unwrap();
    publisher
        .send(&message("mc-0:terminating:1"))
        .await
        .unwrap();
    let got = receive_all(&client, &url, Duration::from_millis(800)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let first = parse(&got[0].body);
    assert_eq!(first.event_id, "mc-0:ready:1");
    assert_eq!(first.status, Status::Ready);
    assert_eq!(got[0].group_id.as_deref(), Some("games/mc-0"));
    assert_eq!(got[0].dedup_id.as_deref(), Some("mc-0:ready:1"));
    let second = parse(&got[1].body);
    assert_eq!(second.event_id, "mc-0:terminating:1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_queues_work_too() {
    let (_moto, client, url) = moto_with_queue("inventory").await;
    Publisher::with_client(client.clone(), url.clone())
        .send(&message("x"))
        .await
        .unwrap();
    let got = receive_all(&client, &url, Duration::from_millis(500)).await;
    for m in &got {
        spotable_fixtures::schema::inventory_message(&m.body).unwrap();
    }
    assert_eq!(got.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_retried_within_bounds_and_sent_once_sqs_is_back() {
    let mut moto = Moto::start(None).unwrap();
    let port = moto.port();
    let client = sqs_client_for(&moto.endpoint());
    let url = create_queue(&client, "inventory.fifo").await;
    moto.stop();
    let publisher = Publisher::with_client(client.clone(), url.clone());

    // Down for good: gives up within the bound, promptly.
    let start = Instant::now();
    let err = publisher
        .send_with_retry(&message("gone"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("gave up"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );

    // Back after a while: the message arrives.
    let sender = tokio::spawn({
        let publisher = publisher.clone();
        async move {
            publisher
                .send_with_retry(&message("later"), Duration::from_secs(30))
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _moto = Moto::start(Some(port)).unwrap();
    // moto keeps no state across restarts: the queue must exist again.
    create_queue(&client, "inventory.fifo").await;
    let attempts = sender.await.unwrap().unwrap();
    assert!(attempts > 1, "{attempts}");
    let got = receive_all(&client, &url, Duration::from_millis(800)).await;
    for m in &got {
        spotable_fixtures::schema::inventory_message(&m.body).unwrap();
    }
    assert_eq!(got.len(), 1);
}
