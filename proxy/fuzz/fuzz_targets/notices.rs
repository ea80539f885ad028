//! The agent's parsers of what arrives from the network: EventBridge envelopes from the
//! interruption queue and instance-metadata notice bodies. Any bytes: never a panic, and what
//! parses as an event names at least one instance, each an EC2 id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spotable_fleet::eventbridge::{self, Parsed};
use spotable_fleet::notice::Notice;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Parsed::Event { id, event, .. }) = eventbridge::parse(text) {
        assert!(!id.is_empty());
        let instances = event.instances();
        assert!(!instances.is_empty(), "an event for no instance");
        assert!(instances.iter().all(|i| !i.is_empty()));
    }
    if let Ok(n) = Notice::parse_spot(text) {
        assert!(n.deadline.is_some(), "a spot notice without its time");
    }
    let _ = Notice::parse_rebalance(text);
    if let Ok(events) = Notice::parse_maintenance(text) {
        for e in events.into_iter().flatten() {
            assert!(e.deadline.is_some());
        }
    }
    let _ = eventbridge::instance_of_provider_id(text);
});
