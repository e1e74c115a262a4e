//! Idle-flow expiry: flows made by real packets through the program, swept at chosen ticks.

use std::time::Duration;

use lb_common::{PROTO_TCP, PROTO_UDP};
use lb_tests::{
    lab::{Lab, CLIENT4},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_SYN},
    world::{flow_key, World, VIP4},
};
use lb_userspace::expiry::{self, ExpiryPlan, ListenerTimeouts};

fn ticks(secs: u64) -> u32 {
    (Duration::from_secs(secs).as_nanos() >> lb_common::FLOW_TICK_SHIFT) as u32
}

#[test]
fn flows_expire_after_their_listeners_idle_timeout() {
    let lab = Lab::new().expect("lab namespace");
    let mut w = World::new().expect("world");
    let open = flow_key(CLIENT4, 40000, VIP4, 80, PROTO_TCP);
    let udp = flow_key(CLIENT4, 40001, VIP4, 80, PROTO_UDP);
    let closed = flow_key(CLIENT4, 40002, VIP4, 80, PROTO_TCP);
    for frame in [
        Packet::tcp(CLIENT4, 40000, VIP4, 80, TCP_SYN),
        Packet::udp(CLIENT4, 40001, VIP4, 80),
        Packet::tcp(CLIENT4, 40002, VIP4, 80, TCP_SYN),
        Packet::tcp(CLIENT4, 40002, VIP4, 80, TCP_FIN | TCP_ACK),
    ] {
        w.run(lab.cli, &frame.bytes()).expect("run");
    }
    let present = |w: &World, k| w.maps.flow(k).expect("lookup").is_some();
    assert!(present(&w, &open) && present(&w, &udp) && present(&w, &closed));

    let timeouts = |name: &str| ListenerTimeouts {
        name: name.into(),
        tcp: Duration::from_secs(350),
        udp: Duration::from_secs(120),
    };
    let plan = ExpiryPlan {
        listeners: [(0, timeouts("web-tcp")), (1, timeouts("web-udp"))].into(),
        targets: Default::default(),
        access_log: false,
    };
    let mut table = w.maps.flow_table().expect("flow table handles");
    let now = expiry::now_ticks();

    let s = expiry::sweep(&mut table, &plan, now);
    assert_eq!(s.expired, 0);
    assert_eq!(
        s.active,
        [("web-tcp".into(), 2), ("web-udp".into(), 1)].into()
    );

    // The closed flow goes after 10 s; the open ones stay.
    let s = expiry::sweep(&mut table, &plan, now + ticks(12));
    assert_eq!(s.expired, 1);
    assert!(!present(&w, &closed) && present(&w, &open) && present(&w, &udp));

    // Below the UDP timeout, nothing; beyond it, the UDP flow.
    assert_eq!(
        expiry::sweep(&mut table, &plan, now + ticks(110)).expired,
        0
    );
    assert_eq!(
        expiry::sweep(&mut table, &plan, now + ticks(123)).expired,
        1
    );
    assert!(!present(&w, &udp) && present(&w, &open));

    // The TCP flow after 350 s.
    assert_eq!(
        expiry::sweep(&mut table, &plan, now + ticks(340)).expired,
        0
    );
    let s = expiry::sweep(&mut table, &plan, now + ticks(353));
    assert_eq!((s.expired, s.active.len()), (1, 0));
    assert!(!present(&w, &open));
}
