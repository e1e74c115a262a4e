//! Packet fixtures: the real XDP object, maps provisioned through the agent's map writer,
//! frames run through BPF_PROG_TEST_RUN; each asserts the verdict, the exact output bytes,
//! the checksums of the output (recomputed from scratch) and the counter it moved.
//! A failing fixture leaves `target/fixture-failures/<name>.pcap` (input, then output).

use anyhow::Result;
use lb_common::{
    counter, FlowKey, FLOW_F_CLOSING, PROTO_TCP, TARGET_DROP, TARGET_FORWARD, TARGET_REMOVED,
    TARGET_RESCHEDULE,
};
use lb_tests::{
    lab::{mac_of, Lab, BK_MAC, CLIENT4, CLIENT6, CLI_MAC, FAR_CLIENT4, ONE_ARM_TARGET, ROUTER4},
    packet::{verify_checksums, Packet, L4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    pcap,
    world::{flow_key, World, TARGETS, VIP4, VIP4B, VIP6},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

#[derive(Clone, Copy)]
enum Side {
    Client,
    Backend,
}

type Step = Box<dyn Fn(&mut World, &Lab) -> Result<()>>;

struct Fx {
    name: String,
    side: Side,
    setup: Vec<Step>,
    input: Vec<u8>,
    action: u32,
    /// None: the frame must leave unchanged.
    output: Option<Vec<u8>>,
    counter: Option<(u32, u64)>,
    check: Option<Step>,
}

fn fx(name: impl Into<String>, input: &Packet) -> Fx {
    fx_bytes(name, input.bytes())
}

fn fx_bytes(name: impl Into<String>, input: Vec<u8>) -> Fx {
    Fx {
        name: name.into(),
        side: Side::Client,
        setup: Vec::new(),
        input,
        action: XDP_PASS,
        output: None,
        counter: None,
        check: None,
    }
}

impl Fx {
    fn expect(mut self, action: u32, output: Option<&Packet>) -> Self {
        self.action = action;
        self.output = output.map(Packet::bytes);
        self
    }
    fn counter(mut self, index: u32, n: u64) -> Self {
        self.counter = Some((index, n));
        self
    }
    fn arriving_from_backend(mut self) -> Self {
        self.side = Side::Backend;
        self
    }
    fn setup(mut self, f: impl Fn(&mut World, &Lab) -> Result<()> + 'static) -> Self {
        self.setup.push(Box::new(f));
        self
    }
    /// Runs `p` from the client side first (e.g. the SYN that creates a flow).
    fn after(self, p: &Packet) -> Self {
        let bytes = p.bytes();
        self.setup(move |w, lab| {
            let (action, _) = w.run(lab.cli, &bytes)?;
            anyhow::ensure!(action != XDP_DROP, "setup packet dropped");
            Ok(())
        })
    }
    /// The expected output is set by a setup step; the frame is redirected.
    fn redirect(mut self) -> Self {
        self.action = XDP_REDIRECT;
        self
    }
    fn check(mut self, f: impl Fn(&mut World, &Lab) -> Result<()> + 'static) -> Self {
        self.check = Some(Box::new(f));
        self
    }
}

fn target(id: u32) -> (&'static str, u16) {
    let t = TARGETS.iter().find(|t| t.0 == id).expect("target");
    (t.1, t.2)
}

fn members(group: u32) -> Vec<u32> {
    TARGETS
        .iter()
        .filter(|t| t.3 == group)
        .map(|t| t.0)
        .collect()
}

/// The packet as the program must forward it to target `id` (toward the backend side).
fn to_target(p: &Packet, id: u32) -> Packet {
    let (addr, port) = target(id);
    p.clone()
        .with_dst(addr, port)
        .forwarded(BK_MAC, mac_of(addr))
}

/// The 5-tuple of a client → VIP packet.
fn key_of(p: &Packet) -> FlowKey {
    let (sport, dport) = match p.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (sport, dport),
        L4::Raw { .. } => panic!("no ports"),
    };
    flow_key(
        &p.src.to_string(),
        sport,
        &p.dst.to_string(),
        dport,
        p.protocol(),
    )
}

fn predicted(w: &World, group: u32, p: &Packet) -> u32 {
    w.predict(group, &members(group), &key_of(p))
}

/// A new flow on `group`: forwarded to the target the table gives it.
fn forwards_new(name: &str, p: Packet, group: u32) -> Fx {
    fx(name, &p).with_predicted(p, group)
}

impl Fx {
    /// Sets the expected output to `p` forwarded to the target predicted for it on `group`;
    /// resolved when the fixture runs (the prediction needs the world).
    fn with_predicted(mut self, p: Packet, group: u32) -> Self {
        let fwd = move |w: &World| to_target(&p, predicted(w, group, &p)).bytes();
        self.setup.push(Box::new(move |w, _| {
            EXPECTED.with(|e| *e.borrow_mut() = Some(fwd(w)));
            Ok(())
        }));
        self.action = XDP_REDIRECT;
        self
    }
}

thread_local! {
    static EXPECTED: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
}

fn syn4(sport: u16, dport: u16) -> Packet {
    Packet::tcp(CLIENT4, sport, VIP4, dport, TCP_SYN)
}

fn ack4(sport: u16, dport: u16) -> Packet {
    Packet::tcp(CLIENT4, sport, VIP4, dport, TCP_ACK | TCP_PSH)
}

/// The target a client-side flow of `p` (group 0) is recorded with.
fn flow_target(w: &World, p: &Packet) -> Result<u32> {
    Ok(w.maps
        .flow(&key_of(p))?
        .ok_or_else(|| anyhow::anyhow!("no flow entry"))?
        .target_id)
}

/// Group 0 holds targets 0 and 1: the one that is not `id`.
fn other(id: u32) -> u32 {
    1 - id
}

fn fixtures() -> Vec<Fx> {
    let mut v = Vec::new();

    // --- New flows, every family and protocol ---
    v.push(forwards_new("tcp_syn_v4_new_flow", syn4(40000, 80), 0));
    v.push(forwards_new(
        "tcp_ack_without_entry_is_scheduled_like_syn",
        ack4(40001, 80),
        0,
    ));
    v.push(forwards_new(
        "udp_v4",
        Packet::udp(CLIENT4, 5000, VIP4, 80),
        0,
    ));
    let mut zero = Packet::udp(CLIENT4, 5001, VIP4, 80);
    zero.l4 = L4::Udp {
        sport: 5001,
        dport: 80,
        zero_checksum: true,
    };
    v.push(forwards_new("udp_v4_zero_checksum_stays_zero", zero, 0));
    let mut opts = syn4(40002, 80);
    opts.ip_options = vec![1, 1, 1, 1, 1, 1, 1, 0];
    v.push(forwards_new("ipv4_with_options", opts, 0));
    let mut max_opts = syn4(40003, 80);
    max_opts.ip_options = vec![1; 40];
    v.push(forwards_new("ipv4_with_40_bytes_of_options", max_opts, 0));
    v.push(forwards_new(
        "tcp_syn_v6",
        Packet::tcp(CLIENT6, 40000, VIP6, 80, TCP_SYN),
        1,
    ));
    v.push(forwards_new(
        "udp_v6",
        Packet::udp(CLIENT6, 5000, VIP6, 80),
        1,
    ));
    let mut vlan = syn4(40004, 80);
    vlan.vlan = Some(100);
    v.push(forwards_new("vlan_tagged_v4_keeps_its_tag", vlan, 0));
    v.push(forwards_new(
        "allowed_source_v4",
        Packet::tcp(CLIENT4, 40005, VIP4, 443, TCP_SYN),
        7,
    ));
    v.push(forwards_new(
        "allowed_source_v6",
        Packet::tcp(CLIENT6, 40005, VIP6, 443, TCP_SYN),
        8,
    ));
    v.push(forwards_new(
        "far_client_through_router",
        Packet::tcp(FAR_CLIENT4, 40006, VIP4, 80, TCP_SYN),
        0,
    ));

    // --- Established flows ---
    let syn = syn4(41000, 80);
    v.push(
        fx("tcp_established_hit_keeps_target", &ack4(41000, 80))
            .after(&syn)
            .with_predicted(ack4(41000, 80), 0)
            .check(|w, _| {
                let stats = w.maps.listener_stats(0)?;
                anyhow::ensure!(
                    stats.in_packets == 2 && stats.new_flows == 1,
                    "stats {stats:?}"
                );
                Ok(())
            }),
    );
    for (name, sport, flags) in [
        ("tcp_fin_marks_flow_closing", 41001, TCP_FIN | TCP_ACK),
        ("tcp_rst_marks_flow_closing", 41002, TCP_RST),
    ] {
        let p = Packet::tcp(CLIENT4, sport, VIP4, 80, flags);
        v.push(
            fx(name, &p)
                .after(&syn4(sport, 80))
                .with_predicted(p.clone(), 0)
                .check(move |w, _| {
                    let key = flow_key(CLIENT4, sport, VIP4, 80, PROTO_TCP);
                    let f = w
                        .maps
                        .flow(&key)?
                        .ok_or_else(|| anyhow::anyhow!("no flow"))?;
                    anyhow::ensure!(f.flags & FLOW_F_CLOSING != 0, "flags {:#x}", f.flags);
                    Ok(())
                }),
        );
    }
    v.push(
        fx("syn_on_established_flow_keeps_target", &syn4(41003, 80))
            .after(&syn4(41003, 80))
            .with_predicted(syn4(41003, 80), 0),
    );

    // --- Target changes ---
    // The flow's target leaves the table (draining): the flow stays on it.
    v.push(
        fx("flow_keeps_target_across_table_change", &ack4(42000, 80))
            .after(&syn4(42000, 80))
            .setup(|w, _| {
                let t = flow_target(w, &syn4(42000, 80))?;
                w.publish(0, &[other(t)])?;
                let (addr, port) = target(t);
                EXPECTED.with(|e| {
                    *e.borrow_mut() = Some(
                        ack4(42000, 80)
                            .with_dst(addr, port)
                            .forwarded(BK_MAC, mac_of(addr))
                            .bytes(),
                    )
                });
                Ok(())
            })
            .redirect(),
    );
    // After the change a new flow only reaches the remaining target.
    v.push(
        fx(
            "new_flow_after_table_change_uses_new_table",
            &syn4(42001, 80),
        )
        .setup(|w, _| {
            let t = w.predict(
                0,
                &members(0),
                &flow_key(CLIENT4, 42001, VIP4, 80, PROTO_TCP),
            );
            w.publish(0, &[other(t)])?;
            EXPECTED
                .with(|e| *e.borrow_mut() = Some(to_target(&syn4(42001, 80), other(t)).bytes()));
            Ok(())
        })
        .redirect(),
    );
    for (name, state, cookie_bump) in [
        ("removed_target_flow_is_rescheduled", TARGET_REMOVED, 0),
        ("reschedule_state_moves_flow", TARGET_RESCHEDULE, 0),
        (
            "reused_target_id_with_new_cookie_moves_flow",
            TARGET_FORWARD,
            1,
        ),
    ] {
        v.push(
            fx(name, &ack4(42002, 80))
                .after(&syn4(42002, 80))
                .setup(move |w, _| {
                    let t = flow_target(w, &syn4(42002, 80))?;
                    let cookie = w.cookies[&t] + cookie_bump;
                    w.set_target(t, state, 0, cookie)?;
                    w.publish(0, &[other(t)])?;
                    EXPECTED.with(|e| {
                        *e.borrow_mut() = Some(to_target(&ack4(42002, 80), other(t)).bytes())
                    });
                    Ok(())
                })
                .redirect()
                .counter(counter::FLOWS_RESCHEDULED, 1)
                .check(|w, _| {
                    let now = flow_target(w, &ack4(42002, 80))?;
                    let first = w.predict(
                        0,
                        &members(0),
                        &flow_key(CLIENT4, 42002, VIP4, 80, PROTO_TCP),
                    );
                    anyhow::ensure!(
                        now == other(first),
                        "flow entry not moved to the new target"
                    );
                    Ok(())
                }),
        );
    }
    v.push(
        fx("terminated_target_drops_its_flows", &ack4(42003, 80))
            .after(&syn4(42003, 80))
            .setup(|w, _| {
                let t = flow_target(w, &syn4(42003, 80))?;
                let cookie = w.cookies[&t];
                w.set_target(t, TARGET_DROP, 0, cookie)
            })
            .expect(XDP_DROP, None)
            .counter(counter::DROP_TARGET_TERMINATED, 1),
    );
    // A FIN closed the tuple; a new SYN on it is a new connection, scheduled on today's table.
    v.push(
        fx("syn_on_closed_tuple_is_scheduled_afresh", &syn4(42004, 80))
            .after(&syn4(42004, 80))
            .after(&Packet::tcp(CLIENT4, 42004, VIP4, 80, TCP_FIN | TCP_ACK))
            .setup(|w, _| {
                let t = flow_target(w, &syn4(42004, 80))?;
                w.publish(0, &[other(t)])?;
                EXPECTED.with(|e| {
                    *e.borrow_mut() = Some(to_target(&syn4(42004, 80), other(t)).bytes())
                });
                Ok(())
            })
            .redirect(),
    );

    // --- Reply path (reverse NAT) ---
    for (name, p, vip, vport, client) in [
        (
            "reply_v4_tcp",
            Packet::tcp("10.2.0.11", 8080, CLIENT4, 40000, TCP_SYN | TCP_ACK),
            VIP4,
            80,
            CLIENT4,
        ),
        (
            "reply_v4_udp",
            Packet::udp("10.2.0.12", 8080, CLIENT4, 5000),
            VIP4,
            80,
            CLIENT4,
        ),
        (
            "reply_v6_tcp",
            Packet::tcp("fd00:2::12", 8080, CLIENT6, 40000, TCP_ACK),
            VIP6,
            80,
            CLIENT6,
        ),
        (
            "reply_to_far_client_via_router",
            Packet::tcp("10.2.0.11", 8080, FAR_CLIENT4, 40000, TCP_ACK),
            VIP4,
            80,
            ROUTER4,
        ),
    ] {
        let out = p
            .clone()
            .with_src(vip, vport)
            .forwarded(CLI_MAC, mac_of(client));
        v.push(
            fx(name, &p)
                .arriving_from_backend()
                .expect(XDP_REDIRECT, Some(&out)),
        );
    }
    let mut reply_zero = Packet::udp("10.2.0.11", 8080, CLIENT4, 5001);
    reply_zero.l4 = L4::Udp {
        sport: 8080,
        dport: 5001,
        zero_checksum: true,
    };
    let mut out = reply_zero
        .clone()
        .with_src(VIP4, 80)
        .forwarded(CLI_MAC, mac_of(CLIENT4));
    out.l4 = L4::Udp {
        sport: 80,
        dport: 5001,
        zero_checksum: true,
    };
    v.push(
        fx("reply_v4_udp_zero_checksum", &reply_zero)
            .arriving_from_backend()
            .expect(XDP_REDIRECT, Some(&out)),
    );
    v.push(
        fx(
            "reply_counts_out_direction",
            &Packet::tcp("10.2.0.11", 8080, CLIENT4, 40000, TCP_ACK),
        )
        .arriving_from_backend()
        .expect(
            XDP_REDIRECT,
            Some(
                &Packet::tcp("10.2.0.11", 8080, CLIENT4, 40000, TCP_ACK)
                    .with_src(VIP4, 80)
                    .forwarded(CLI_MAC, mac_of(CLIENT4)),
            ),
        )
        .check(|w, _| {
            let s = w.maps.listener_stats(0)?;
            anyhow::ensure!(s.out_packets == 1 && s.in_packets == 0, "stats {s:?}");
            Ok(())
        }),
    );
    // The agent's own health check: a reply to this host is not NATed.
    v.push(
        fx(
            "reply_to_this_host_passes_untouched",
            &Packet::tcp("10.2.0.11", 8080, "10.2.0.1", 50000, TCP_SYN | TCP_ACK),
        )
        .arriving_from_backend()
        .counter(counter::PASS_FIB_OTHER, 1),
    );
    let mut reply_ttl = Packet::tcp("10.2.0.11", 8080, CLIENT4, 40000, TCP_ACK);
    reply_ttl.ttl = 1;
    v.push(
        fx("reply_with_ttl_1_passes", &reply_ttl)
            .arriving_from_backend()
            .counter(counter::PASS_TTL_EXPIRED, 1),
    );
    // A target endpoint serving two listeners: the reply takes the VIP its flow came in on.
    for (vip, name) in [
        (VIP4B, "shared_endpoint_reply_uses_flow_vip_b"),
        (VIP4, "shared_endpoint_reply_uses_flow_vip_a"),
    ] {
        let reply = Packet::tcp("10.2.0.13", 8080, CLIENT4, 43000, TCP_SYN | TCP_ACK);
        v.push(
            fx(name, &reply)
                .arriving_from_backend()
                .after(&Packet::tcp(CLIENT4, 43000, vip, 81, TCP_SYN))
                .expect(
                    XDP_REDIRECT,
                    Some(
                        &reply
                            .clone()
                            .with_src(vip, 81)
                            .forwarded(CLI_MAC, mac_of(CLIENT4)),
                    ),
                ),
        );
    }
    v.push(
        fx(
            "shared_endpoint_reply_without_flow_drops",
            &Packet::tcp("10.2.0.13", 8080, CLIENT4, 43001, TCP_ACK),
        )
        .arriving_from_backend()
        .expect(XDP_DROP, None)
        .counter(counter::DROP_REPLY_UNKNOWN, 1),
    );

    // --- Forwarding choices ---
    let one_arm = Packet::tcp(CLIENT4, 44000, VIP4, 8080, TCP_SYN);
    v.push(
        fx("one_arm_target_uses_xdp_tx", &one_arm).expect(
            XDP_TX,
            Some(
                &one_arm
                    .clone()
                    .with_dst(ONE_ARM_TARGET, 8080)
                    .forwarded(CLI_MAC, mac_of(ONE_ARM_TARGET)),
            ),
        ),
    );
    let no_neigh = Packet::tcp(CLIENT4, 44001, VIP4, 8081, TCP_SYN);
    v.push(
        fx(
            "unknown_neighbour_passes_rewritten_with_ttl_kept",
            &no_neigh,
        )
        .expect(
            XDP_PASS,
            Some(&no_neigh.clone().with_dst("10.2.0.99", 8080)),
        )
        .counter(counter::PASS_NO_NEIGHBOUR, 1),
    );
    v.push(
        fx("egress_not_in_devmap_passes_rewritten", &syn4(44002, 80))
            .setup(|w, lab| w.maps.remove_interface(lab.bk))
            .setup(|w, _| {
                let t = w.predict(
                    0,
                    &members(0),
                    &flow_key(CLIENT4, 44002, VIP4, 80, PROTO_TCP),
                );
                let (addr, port) = target(t);
                EXPECTED
                    .with(|e| *e.borrow_mut() = Some(syn4(44002, 80).with_dst(addr, port).bytes()));
                Ok(())
            })
            .counter(counter::PASS_FIB_OTHER, 1),
    );

    // --- Not forwarded ---
    v.push(fx(
        "non_vip_passes_untouched",
        &Packet::tcp(CLIENT4, 40000, "10.2.0.11", 22, TCP_SYN),
    ));
    v.push(fx(
        "non_vip_udp_passes_untouched",
        &Packet::udp(CLIENT4, 40000, "10.2.0.11", 53),
    ));
    v.push(fx(
        "non_vip_icmp_passes_untouched",
        &Packet::new(
            CLIENT4,
            "10.2.0.11",
            L4::Raw {
                protocol: 1,
                bytes: vec![8, 0, 0xf7, 0xfe, 0, 1, 0, 0],
            },
        ),
    ));
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[0x02, 0xcc, 0, 0, 0, 2, 0x08, 0x06]);
    arp.extend_from_slice(&[
        0, 1, 8, 0, 6, 4, 0, 1, 0x02, 0xcc, 0, 0, 0, 2, 10, 1, 0, 2, 0, 0, 0, 0, 0, 0, 10, 9, 0, 10,
    ]);
    v.push(fx_bytes("arp_for_vip_passes", arp));
    v.push(
        fx("non_listener_port_drops", &syn4(40000, 22))
            .expect(XDP_DROP, None)
            .counter(counter::DROP_NO_LISTENER, 1),
    );
    v.push(
        fx(
            "listener_port_wrong_protocol_drops",
            &Packet::udp(CLIENT4, 40000, VIP4, 443),
        )
        .expect(XDP_DROP, None)
        .counter(counter::DROP_NO_LISTENER, 1),
    );
    v.push(
        fx(
            "icmp_echo_to_vip_drops",
            &Packet::new(
                CLIENT4,
                VIP4,
                L4::Raw {
                    protocol: 1,
                    bytes: vec![8, 0, 0xf7, 0xfe, 0, 1, 0, 0],
                },
            ),
        )
        .expect(XDP_DROP, None)
        .counter(counter::DROP_NO_LISTENER, 1),
    );
    v.push(fx(
        "icmpv6_neighbour_solicitation_to_vip_passes",
        &Packet::new(
            CLIENT6,
            VIP6,
            L4::Raw {
                protocol: 58,
                bytes: vec![135, 0, 0, 0, 0, 0, 0, 0],
            },
        ),
    ));
    v.push(
        fx(
            "icmpv6_echo_to_vip_drops",
            &Packet::new(
                CLIENT6,
                VIP6,
                L4::Raw {
                    protocol: 58,
                    bytes: vec![128, 0, 0, 0, 0, 1, 0, 1],
                },
            ),
        )
        .expect(XDP_DROP, None)
        .counter(counter::DROP_NO_LISTENER, 1),
    );
    v.push(
        fx(
            "source_not_allowed_v4_drops",
            &Packet::tcp(FAR_CLIENT4, 40000, VIP4, 443, TCP_SYN),
        )
        .expect(XDP_DROP, None)
        .counter(counter::DROP_SOURCE_NOT_ALLOWED, 1),
    );
    v.push(
        fx(
            "source_not_allowed_v6_drops",
            &Packet::tcp("fd00:3::2", 40000, VIP6, 443, TCP_SYN),
        )
        .expect(XDP_DROP, None)
        .counter(counter::DROP_SOURCE_NOT_ALLOWED, 1),
    );
    let mut ttl1 = syn4(40000, 80);
    ttl1.ttl = 1;
    v.push(
        fx("ttl_1_passes_for_time_exceeded", &ttl1)
            .counter(counter::PASS_TTL_EXPIRED, 1)
            .check(|w, _| {
                anyhow::ensure!(
                    w.maps
                        .flow(&flow_key(CLIENT4, 40000, VIP4, 80, PROTO_TCP))?
                        .is_none(),
                    "flow created"
                );
                Ok(())
            }),
    );
    let mut hop1 = Packet::tcp(CLIENT6, 40000, VIP6, 80, TCP_SYN);
    hop1.ttl = 1;
    v.push(fx("hop_limit_1_passes", &hop1).counter(counter::PASS_TTL_EXPIRED, 1));
    let mut mf = syn4(40000, 80);
    mf.frag = 0x2000;
    v.push(
        fx("first_fragment_drops", &mf)
            .expect(XDP_DROP, None)
            .counter(counter::DROP_FRAGMENT, 1),
    );
    let mut later = Packet::udp(CLIENT4, 40000, VIP4, 80);
    later.frag = 0x00b9;
    v.push(
        fx("later_fragment_drops", &later)
            .expect(XDP_DROP, None)
            .counter(counter::DROP_FRAGMENT, 1),
    );
    let mut later_nonvip = Packet::udp(CLIENT4, 40000, "10.2.0.11", 80);
    later_nonvip.frag = 0x00b9;
    v.push(fx("non_vip_fragment_passes", &later_nonvip));
    for (code, name, reason) in [
        (44, "ipv6_fragment_header_drops", counter::DROP_FRAGMENT),
        (
            0,
            "ipv6_hop_by_hop_header_drops",
            counter::DROP_IPV6_EXTENSION,
        ),
        (
            43,
            "ipv6_routing_header_drops",
            counter::DROP_IPV6_EXTENSION,
        ),
        (
            60,
            "ipv6_destination_options_drops",
            counter::DROP_IPV6_EXTENSION,
        ),
    ] {
        let mut p = Packet::tcp(CLIENT6, 40000, VIP6, 80, TCP_SYN);
        p.ipv6_ext = Some(code);
        v.push(fx(name, &p).expect(XDP_DROP, None).counter(reason, 1));
    }
    let mut bad_ihl = syn4(40000, 80).bytes();
    bad_ihl[14] = 0x44;
    v.push(
        fx_bytes("ihl_below_5_drops", bad_ihl)
            .expect(XDP_DROP, None)
            .counter(counter::DROP_MALFORMED, 1),
    );
    let mut long = syn4(40000, 80).bytes();
    long[17] += 10;
    v.push(
        fx_bytes("ip_length_beyond_frame_drops", long)
            .expect(XDP_DROP, None)
            .counter(counter::DROP_MALFORMED, 1),
    );
    v.push(
        fx("empty_group_drops", &syn4(40000, 8082))
            .expect(XDP_DROP, None)
            .counter(counter::DROP_NO_TARGET, 1),
    );
    v.push(
        fx("unconfigured_dataplane_drops", &syn4(40000, 80))
            .setup(|w, _| w.maps.set_config(&Default::default()))
            .expect(XDP_DROP, None)
            .counter(counter::DROP_NOT_READY, 1),
    );

    // --- Every truncation of valid frames ---
    // Shorter than Ethernet + the fixed IP header: the destination is unknown, the stack gets
    // it (and drops it). Longer: a VIP's packet with a cut header or payload is dropped.
    // BPF_PROG_TEST_RUN refuses frames under 14 bytes, which never reach XDP anyway.
    for (name, p, fixed) in [
        ("tcp_v4", syn4(45000, 80), 34),
        ("udp_v4", Packet::udp(CLIENT4, 45000, VIP4, 80), 34),
        ("tcp_v6", Packet::tcp(CLIENT6, 45000, VIP6, 80, TCP_SYN), 54),
        ("udp_v6", Packet::udp(CLIENT6, 45000, VIP6, 80), 54),
    ] {
        let full = p.bytes();
        for len in 14..full.len() {
            let f = fx_bytes(format!("truncated_{name}_to_{len}"), full[..len].to_vec());
            v.push(if len < fixed {
                f
            } else {
                f.expect(XDP_DROP, None).counter(counter::DROP_MALFORMED, 1)
            });
        }
    }
    let reply = Packet::tcp("10.2.0.11", 8080, CLIENT4, 40000, TCP_ACK).bytes();
    for len in 14..reply.len() {
        v.push(
            fx_bytes(format!("truncated_reply_to_{len}"), reply[..len].to_vec())
                .arriving_from_backend(),
        );
    }
    v
}

/// Runs `f` on `shared` when given (fixtures that leave no state behind), else on a freshly
/// loaded world.
fn run_fixture(lab: &Lab, f: &Fx, shared: Option<&mut World>) -> Result<Result<(), String>> {
    let mut fresh;
    let w = match shared {
        Some(w) => w,
        None => {
            fresh = World::new()?;
            &mut fresh
        }
    };
    EXPECTED.with(|e| *e.borrow_mut() = None);
    for step in &f.setup {
        step(w, lab)?;
    }
    let before = w.maps.counters()?;
    let ingress = match f.side {
        Side::Client => lab.cli,
        Side::Backend => lab.bk,
    };
    let (action, out) = w.run(ingress, &f.input)?;
    let expected = EXPECTED
        .with(|e| e.borrow().clone())
        .or_else(|| f.output.clone())
        .unwrap_or_else(|| f.input.clone());
    let mut problems = Vec::new();
    if action != f.action {
        problems.push(format!("action {action}, want {}", f.action));
    }
    if out != expected {
        problems.push(format!(
            "output differs from expected:\n  got  {}\n  want {}",
            hex(&out),
            hex(&expected)
        ));
    }
    if out != f.input {
        if let Err(e) = verify_checksums(&out) {
            problems.push(format!("bad {e} in output"));
        }
    }
    if let Some((index, n)) = f.counter {
        let after = w.maps.counters()?;
        if after[index as usize] - before[index as usize] != n {
            problems.push(format!(
                "counter {index} moved by {}, want {n}",
                after[index as usize] - before[index as usize]
            ));
        }
    }
    if let Some(check) = &f.check {
        if let Err(e) = check(w, lab) {
            problems.push(format!("check: {e:#}"));
        }
    }
    if problems.is_empty() {
        return Ok(Ok(()));
    }
    let path = pcap::write(&f.name, &[&f.input, &out])?;
    Ok(Err(format!(
        "{}: {} (pcap: {})",
        f.name,
        problems.join("; "),
        path.display()
    )))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn packet_fixtures() {
    let lab = Lab::new().expect("lab namespace");
    let all = fixtures();
    let named = all
        .iter()
        .filter(|f| !f.name.starts_with("truncated_"))
        .count();
    assert!(named >= 40, "only {named} named fixtures");
    let mut failures = Vec::new();
    // Truncated frames are dropped or passed: they create no flow, so they share one world.
    let mut shared = World::new().expect("world");
    for f in &all {
        let stateless = f.name.starts_with("truncated_") && f.setup.is_empty();
        match run_fixture(&lab, f, stateless.then_some(&mut shared)) {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => failures.push(msg),
            Err(e) => failures.push(format!("{}: harness error: {e:#}", f.name)),
        }
    }
    println!(
        "{} fixtures ({named} named, {} truncations), {} failed",
        all.len(),
        all.len() - named,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

/// Source-IP stickiness: every connection from one client lands on one target, while the
/// same ports without stickiness spread over both.
#[test]
fn source_ip_stickiness() {
    let lab = Lab::new().expect("lab namespace");
    let mut w = World::new().expect("world");
    let mut sticky = std::collections::BTreeSet::new();
    let mut spread = std::collections::BTreeSet::new();
    for sport in 46000..46040 {
        let (a, out) = w
            .run(
                lab.cli,
                &Packet::tcp(CLIENT4, sport, VIP4, 8443, TCP_SYN).bytes(),
            )
            .unwrap();
        assert_eq!(a, XDP_REDIRECT);
        sticky.insert(out[30..34].to_vec());
        let (a, out) = w.run(lab.cli, &syn4(sport, 80).bytes()).unwrap();
        assert_eq!(a, XDP_REDIRECT);
        spread.insert(out[30..34].to_vec());
    }
    assert_eq!(
        sticky.len(),
        1,
        "sticky listener used {} targets",
        sticky.len()
    );
    assert_eq!(
        spread.len(),
        2,
        "non-sticky listener used {} targets",
        spread.len()
    );
}
