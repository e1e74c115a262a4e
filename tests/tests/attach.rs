//! The program attaches to a veth in native (driver) mode and in generic mode, inside a
//! private network namespace, and the kernel reports it attached in that mode.

use aya::programs::XdpMode;
use lb_common::maps::PROGRAM_XDP;
use lb_tests::lab::{enter_private_netns, sh};
use lb_userspace::dataplane::{self, MapSizes};

fn attached_mode(ifname: &str) -> String {
    // The first line names the mode among the link's attributes: "... mtu 1500 xdpgeneric ...".
    let out = sh(&format!("ip -d link show {ifname}")).expect("ip link");
    let first = out.lines().next().unwrap_or_default();
    if first.contains(" xdpgeneric ") {
        "generic".into()
    } else if first.contains(" xdp ") {
        "native".into()
    } else {
        "none".into()
    }
}

#[test]
fn attaches_native_and_generic_on_veth() {
    enter_private_netns().expect("netns");
    sh("ip link add lbt0 type veth peer name lbt1 && ip link set lbt0 up && ip link set lbt1 up")
        .unwrap();
    let mut ebpf = dataplane::load(MapSizes {
        flow_table: 1024,
        table_slots: 1024,
    })
    .expect("load");
    let prog = dataplane::program_mut(&mut ebpf, PROGRAM_XDP).expect("program");
    for (mode, name) in [(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")] {
        assert_eq!(attached_mode("lbt0"), "none");
        let link = prog
            .attach("lbt0", mode)
            .unwrap_or_else(|e| panic!("{name} attach: {e}"));
        assert_eq!(attached_mode("lbt0"), name);
        prog.detach(link).expect("detach");
    }
    assert_eq!(attached_mode("lbt0"), "none");
}
