//! A loaded data plane with the fixture configuration, provisioned through the agent's map
//! writer (`lb_userspace::maps::KernelMaps`) and its consistent-hash builder.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context, Result};
use aya::{
    programs::{TestRun, TestRunOptions},
    Ebpf,
};
use lb_common::{
    addr, hash, maglev, maps::PROGRAM_XDP, DataplaneConfig, EndpointKey, FlowKey, IfaceValue,
    ListenerValue, ReverseValue, TargetValue, VipValue, CONFIG_F_READY, GROUP_F_STICKY_SOURCE,
    IFACE_F_TARGETS, LISTENER_F_ALLOW_ALL_V4, LISTENER_F_ALLOW_ALL_V6, PROTO_TCP, PROTO_UDP,
    REVERSE_F_AMBIGUOUS, TARGET_FORWARD, TARGET_F_SHARED_ENDPOINT,
};
use lb_userspace::{
    dataplane::{self, MapSizes},
    maps::{table_of_ids, KernelMaps, SourcePrefix},
    state,
};

pub const HASH_KEY: [u32; 2] = [0x1234_5678, 0x9abc_def0];
pub const TABLE_SIZE: u32 = 97;
pub const VIP4: &str = "10.9.0.10";
pub const VIP4B: &str = "10.9.0.11";
pub const VIP6: &str = "fd00:9::10";

/// (id, address, port, group)
pub const TARGETS: [(u32, &str, u16, u32); 11] = [
    (0, "10.2.0.11", 8080, 0),
    (1, "10.2.0.12", 8080, 0),
    (2, "fd00:2::11", 8080, 1),
    (3, "fd00:2::12", 8080, 1),
    (4, "10.1.0.50", 8080, 2),
    (5, "10.2.0.11", 9000, 3),
    (6, "10.2.0.12", 9000, 3),
    (7, "10.2.0.13", 8080, 4),
    (8, "10.2.0.99", 8080, 5),
    (9, "10.2.0.12", 8443, 7),
    (10, "fd00:2::12", 8443, 8),
];

/// (id, VIP, port, protocol, group, allowed sources: None = everything)
pub type ListenerRow = (u32, &'static str, u16, u8, u32, Option<&'static str>);
pub const LISTENERS: [ListenerRow; 12] = [
    (0, VIP4, 80, PROTO_TCP, 0, None),
    (1, VIP4, 80, PROTO_UDP, 0, None),
    (2, VIP6, 80, PROTO_TCP, 1, None),
    (3, VIP6, 80, PROTO_UDP, 1, None),
    (4, VIP4, 443, PROTO_TCP, 7, Some("10.1.0.0/24")),
    (5, VIP4, 8443, PROTO_TCP, 3, None),
    (6, VIP4, 81, PROTO_TCP, 4, None),
    (7, VIP4B, 81, PROTO_TCP, 4, None),
    (8, VIP4, 8080, PROTO_TCP, 2, None),
    (9, VIP4, 8081, PROTO_TCP, 5, None),
    (10, VIP4, 8082, PROTO_TCP, 6, None),
    (11, VIP6, 443, PROTO_TCP, 8, Some("fd00:1::/64")),
];
pub const STICKY_GROUP: u32 = 3;
pub const GROUPS: u32 = 9;

/// The listener/reverse key of a fixture endpoint (the agent's own `state::endpoint_key`).
pub fn endpoint(ip: &str, port: u16, protocol: u8) -> EndpointKey {
    state::endpoint_key(ip.parse().expect("address"), port, protocol)
}

/// A fixture target's consistent-hash identity (the agent's own `state::identity`).
pub fn identity(addr: &str, port: u16) -> Vec<u8> {
    state::identity(addr.parse().expect("address"), port)
}

pub struct World {
    pub ebpf: Ebpf,
    pub maps: KernelMaps,
    /// Target id → cookie, as last written.
    pub cookies: BTreeMap<u32, u32>,
}

impl World {
    /// Loads the object and provisions the fixture configuration.
    pub fn new() -> Result<Self> {
        Self::with_flow_table(4096)
    }

    /// As `new`, with a flow table of `flow_table` entries.
    pub fn with_flow_table(flow_table: u32) -> Result<Self> {
        let mut ebpf = dataplane::load(MapSizes {
            flow_table,
            table_slots: GROUPS * 2 * TABLE_SIZE,
        })?;
        let maps = KernelMaps::new(&mut ebpf)?;
        let mut w = Self {
            ebpf,
            maps,
            cookies: BTreeMap::new(),
        };
        w.provision()?;
        Ok(w)
    }

    fn provision(&mut self) -> Result<()> {
        self.maps.set_config(&DataplaneConfig {
            hash_key: HASH_KEY,
            flags: CONFIG_F_READY,
            flow_insert_limit: 0,
        })?;
        for vip in [VIP4, VIP4B, VIP6] {
            self.maps
                .put_vip(vip.parse()?, VipValue { listener_count: 1 })?;
        }
        // Which listeners each target endpoint serves decides how replies find their VIP.
        let mut served: BTreeMap<EndpointKey, Vec<(u32, &str, u16, u32)>> = BTreeMap::new();
        for &(lid, vip, port, proto, group, allowed) in &LISTENERS {
            let family_flag = if vip.contains(':') {
                LISTENER_F_ALLOW_ALL_V6
            } else {
                LISTENER_F_ALLOW_ALL_V4
            };
            let flags = if allowed.is_none() { family_flag } else { 0 };
            self.maps.put_listener(
                endpoint(vip, port, proto),
                ListenerValue {
                    listener_id: lid,
                    group_id: group,
                    flags,
                },
            )?;
            if let Some(cidr) = allowed {
                let (a, len) = cidr.split_once('/').expect("cidr");
                self.maps.allow_source(
                    lid,
                    SourcePrefix {
                        addr: a.parse()?,
                        len: len.parse()?,
                    },
                )?;
            }
            for &(_, taddr, tport, tgroup) in &TARGETS {
                if tgroup == group {
                    served
                        .entry(endpoint(taddr, tport, proto))
                        .or_default()
                        .push((lid, vip, port, flags));
                }
            }
        }
        for (key, listeners) in &served {
            let (lid, vip, port, listener_flags) = listeners[0];
            let (vip_addr, _) = addr::to_words(vip.parse()?);
            let ambiguous = listeners.len() > 1;
            self.maps.put_reverse(
                *key,
                ReverseValue {
                    vip_addr,
                    vip_port_be: port.to_be(),
                    _pad: 0,
                    listener_id: lid,
                    flags: if ambiguous {
                        REVERSE_F_AMBIGUOUS
                    } else {
                        state::reverse_allow_flags(listener_flags)
                    },
                },
            )?;
        }
        for &(id, taddr, tport, _) in &TARGETS {
            let shared = served
                .iter()
                .any(|(k, l)| l.len() > 1 && *k == endpoint(taddr, tport, k.protocol));
            self.set_target(
                id,
                TARGET_FORWARD,
                if shared { TARGET_F_SHARED_ENDPOINT } else { 0 },
                1,
            )?;
        }
        for group in 0..GROUPS {
            let members: Vec<u32> = TARGETS
                .iter()
                .filter(|t| t.3 == group)
                .map(|t| t.0)
                .collect();
            self.publish(group, &members)?;
        }
        // The client side faces clients only; replies from targets arrive on bk0.
        self.maps
            .add_interface(crate::lab::ifindex("cli0")?, IfaceValue { flags: 0 })?;
        self.maps.add_interface(
            crate::lab::ifindex("bk0")?,
            IfaceValue {
                flags: IFACE_F_TARGETS,
            },
        )?;
        Ok(())
    }

    /// Sets `flow_insert_limit` (new entries per CPU per second; 0: none).
    pub fn set_insert_limit(&mut self, limit: u32) -> Result<()> {
        let mut config = self.maps.config()?;
        config.flow_insert_limit = limit;
        Ok(self.maps.set_config(&config)?)
    }

    /// Writes target `id` with `state`, `flags` and `cookie`.
    pub fn set_target(&mut self, id: u32, state: u8, flags: u32, cookie: u32) -> Result<()> {
        let &(_, taddr, tport, _) = TARGETS.iter().find(|t| t.0 == id).context("target id")?;
        let (addr, family) = addr::to_words(taddr.parse()?);
        self.maps.put_target(
            id,
            &TargetValue {
                addr,
                port_be: tport.to_be(),
                family,
                state,
                cookie,
                flags,
                _pad: 0,
            },
        )?;
        self.cookies.insert(id, cookie);
        Ok(())
    }

    /// Builds and publishes `group`'s table over `members` (target ids).
    pub fn publish(&mut self, group: u32, members: &[u32]) -> Result<()> {
        let table = group_table(members)?;
        let flags = if group == STICKY_GROUP {
            GROUP_F_STICKY_SOURCE
        } else {
            0
        };
        Ok(self
            .maps
            .publish_table(group, flags, &table_of_ids(&table, members))?)
    }

    /// The target id the group's current table gives a new flow (predicted from lb-common's
    /// hash, the function the program runs).
    pub fn predict(&self, group: u32, members: &[u32], key: &FlowKey) -> u32 {
        let table = group_table(members).expect("table");
        let h = if group == STICKY_GROUP {
            hash::source_hash(HASH_KEY, &key.src_addr)
        } else {
            hash::flow_hash(HASH_KEY, key)
        };
        members[table[(h % TABLE_SIZE) as usize] as usize]
    }

    /// Runs one frame through `lb_xdp` as if received on `ingress`: (action, output frame).
    pub fn run(&mut self, ingress: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog = dataplane::program_mut(&mut self.ebpf, PROGRAM_XDP)?;
        run_prog(prog, ingress, frame)
    }
}

/// The Maglev table (indices into `members`) of a group of fixture targets, weight 1 each.
fn group_table(members: &[u32]) -> Result<Vec<u32>> {
    let ids: Vec<Vec<u8>> = members
        .iter()
        .map(|id| {
            let t = TARGETS.iter().find(|t| t.0 == *id).expect("target id");
            identity(t.1, t.2)
        })
        .collect();
    let backends: Vec<maglev::Backend> = ids
        .iter()
        .map(|i| maglev::Backend {
            identity: i,
            weight: 1,
        })
        .collect();
    Ok(maglev::build(&backends, TABLE_SIZE, 0)?)
}

/// One `BPF_PROG_TEST_RUN` of an XDP program with `ingress` as the receiving interface.
pub fn run_prog(prog: &aya::programs::Xdp, ingress: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    run_prog_timed(prog, ingress, frame).map(|(action, out, _)| (action, out))
}

/// As `run_prog`, with the run time the kernel measured.
pub fn run_prog_timed(
    prog: &aya::programs::Xdp,
    ingress: u32,
    frame: &[u8],
) -> Result<(u32, Vec<u8>, std::time::Duration)> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let md: [u32; 6] = [0, frame.len() as u32, 0, ingress, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; frame.len() + 512];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    let n = r.data_size_out as usize;
    out.truncate(n);
    Ok((r.return_value, out, r.duration))
}

/// The 5-tuple of a client → VIP packet.
pub fn flow_key(src: &str, sport: u16, dst: &str, dport: u16, protocol: u8) -> FlowKey {
    let (s, family) = addr::to_words(src.parse::<IpAddr>().expect("src"));
    let (d, _) = addr::to_words(dst.parse::<IpAddr>().expect("dst"));
    FlowKey {
        src_addr: s,
        dst_addr: d,
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        protocol,
        family,
        _pad: 0,
    }
}
