//! The kernel's maps behind the reconciler's `MapWriter`: they answer as the fake the property
//! test trusts does, removals of absent entries say so (and the reconciler counts them done),
//! and table slots are given back and reused.

use std::{net::IpAddr, time::Instant};

use lb_common::{VipValue, TARGET_FORWARD};
use lb_userspace::{
    config,
    control::Controller,
    dataplane::{self, MapSizes},
    maps::{regions::QUARANTINE, FakeMaps, KernelMaps, MapWriter, WriteError},
    reconcile::expected_view,
};

fn kernel(table_slots: u32) -> (aya::Ebpf, KernelMaps) {
    let mut ebpf = dataplane::load(MapSizes {
        flow_table: 1024,
        table_slots,
    })
    .expect("load");
    let maps = KernelMaps::new(&mut ebpf).expect("maps");
    (ebpf, maps)
}

const CONFIG: &str = r#"[agent]
interfaces = ["eth0", "eth1"]
target_interfaces = ["eth1"]

[[listener]]
name = "web"
address = "10.9.0.10"
port = 80
protocol = "tcp_udp"
target_group = "GROUP"
allowed_sources = ["10.1.0.0/24", "0.0.0.0/0"]

[[listener]]
name = "v6"
address = "fd00:9::10"
port = 443
target_group = "six"
allowed_sources = ["fd00:1::/64"]

[[target_group]]
name = "GROUP"
hash_table_size = SIZE
stickiness = "source_ip"

[[target_group.target]]
address = "10.2.0.11"
port = 8080

[[target_group.target]]
address = "10.2.0.12"
port = 8080

[[target_group]]
name = "six"
hash_table_size = 101

[[target_group.target]]
address = "fd00:2::11"
port = 8443
"#;

fn config(group: &str, size: u32) -> config::Config {
    let text = CONFIG
        .replace("GROUP", group)
        .replace("SIZE", &size.to_string());
    config::parse(&text, "maps.toml").expect("config")
}

fn interfaces() -> std::collections::BTreeMap<String, u32> {
    [("eth0".to_string(), 3), ("eth1".to_string(), 4)].into()
}

/// The same controller steps written to the kernel and to the fake leave the same contents.
#[test]
fn the_kernel_holds_what_the_fake_holds() {
    let (_ebpf, mut k) = kernel(4096);
    let mut fake = FakeMaps::default();
    let t0 = Instant::now();
    let mut a = Controller::new(config("blue", 97), [5, 6], interfaces(), t0).expect("ctl");
    let mut b = Controller::new(config("blue", 97), [5, 6], interfaces(), t0).expect("ctl");
    let steps = [("blue", 97), ("green", 211), ("green", 97), ("blue", 101)];
    for (n, &(group, size)) in steps.iter().enumerate() {
        let now = t0 + QUARANTINE * 2 * n as u32;
        if n > 0 {
            a.reload(config(group, size), now).expect("reload");
            b.reload(config(group, size), now).expect("reload");
        }
        a.reconcile(&mut k, now).expect("kernel reconcile");
        b.reconcile(&mut fake, now).expect("fake reconcile");
        let view = k.view().expect("kernel view");
        assert_eq!(view, fake.view().expect("fake view"), "step {n}");
        assert_eq!(
            view,
            expected_view(&a.desired(now)).expect("expected"),
            "step {n}"
        );
        assert!(view.targets.values().any(|t| t.state == TARGET_FORWARD));
    }
}

#[test]
fn removing_what_is_absent_says_not_found() {
    let (_ebpf, mut k) = kernel(4096);
    let vip: IpAddr = "10.9.0.99".parse().unwrap();
    let not_found = |r: Result<(), WriteError>| matches!(r, Err(WriteError::NotFound(_)));
    assert!(not_found(k.remove_vip(vip)));
    assert!(not_found(k.remove_interface(42)));
    k.put_vip(vip, VipValue { listener_count: 1 }).expect("put");
    k.remove_vip(vip).expect("present: removed");
    assert!(not_found(k.remove_vip(vip)));
    // A group never published is removed without complaint.
    k.remove_table(9).expect("remove an empty group");
}

/// Renamed and resized groups give their slots back: far more tables than the budget holds
/// at once come and go.
#[test]
fn table_slots_are_given_back_and_reused() {
    let (_ebpf, mut k) = kernel(4 * 211);
    for round in 0..20u32 {
        let gid = round % 200;
        let size = [97, 101, 211][round as usize % 3];
        let table: Vec<u32> = (0..size).map(|i| i % 7).collect();
        k.publish_table(gid, 0, &table)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        k.publish_table(gid, 0, &table)
            .unwrap_or_else(|e| panic!("round {round}, second half: {e}"));
        assert_eq!(k.active_table(gid).expect("read"), table);
        k.remove_table(gid).expect("remove");
        assert!(k.active_table(gid).expect("read").is_empty());
        std::thread::sleep(QUARANTINE); // freed slots wait out the quarantine
    }
}

/// A group whose table becomes empty keeps no slots: a restart that reads the layout back
/// finds none to hold for it.
#[test]
fn an_empty_table_keeps_no_slots() {
    let (_ebpf, mut k) = kernel(4096);
    let table: Vec<u32> = (0..97).map(|i| i % 3).collect();
    k.publish_table(4, 0, &table).expect("publish");
    k.publish_table(4, 0, &table)
        .expect("publish again: both halves hold it");
    k.publish_table(4, 0, &[]).expect("publish empty");
    let g = k.group(4).expect("group");
    assert_eq!(g.table_size, [0, 0], "{g:?}");
}
