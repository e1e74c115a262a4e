//! A loaded data plane with the fixture configuration, provisioned as the agent provisions it:
//! a config file's text through the agent's config loader, the agent's controller (target
//! model, desired state) and its reconciler, writing through its map writer
//! (`lb_userspace::maps::KernelMaps`). Predictions of where a flow goes are made independently
//! of the agent: lb-common's Maglev and hash over the fixture constants.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, time::Instant};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{TestRun, TestRunOptions},
    Ebpf,
};
use lb_common::{
    addr, hash, maglev, maps::PROGRAM_XDP, EndpointKey, FlowKey, NextHop, TargetValue,
    GROUP_F_STICKY_SOURCE, PROTO_TCP, PROTO_UDP,
};
use lb_userspace::{
    config,
    control::Controller,
    dataplane::{self, MapSizes},
    maps::{table_of_ids, KernelMaps},
    model::{Model, TargetKey},
    state,
};

pub const HASH_KEY: [u32; 2] = [0x1234_5678, 0x9abc_def0];
pub const TABLE_SIZE: u32 = 97;
/// Every fixture target's weight.
pub const WEIGHT: u32 = 1;
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
/// The `LB_ROUTE_EPOCH` a fixture world starts with.
pub const FIXTURE_ROUTE_EPOCH: u32 = 1;
pub const GROUPS: u32 = 9;

/// The interface that faces clients, and the one replies from targets arrive on.
pub const CLIENT_IFACE: &str = "cli0";
pub const TARGET_IFACE: &str = "bk0";

/// The listener/reverse key of a fixture endpoint (the agent's own `state::endpoint_key`).
pub fn endpoint(ip: &str, port: u16, protocol: u8) -> EndpointKey {
    state::endpoint_key(ip.parse().expect("address"), port, protocol)
}

/// A fixture target's consistent-hash identity (the agent's own `state::identity`).
pub fn identity(addr: &str, port: u16) -> Vec<u8> {
    state::identity(addr.parse().expect("address"), port)
}

/// The config file's name of fixture group `group`.
pub fn group_name(group: u32) -> String {
    format!("g{group}")
}

/// The config file's name of fixture listener `id`.
pub fn listener_name(id: u32) -> String {
    format!("l{id}")
}

/// The fixture world as an agent config file: listeners, groups and targets in the order that
/// gives them the fixture ids.
pub fn config_text() -> String {
    let mut c = format!(
        "[agent]\ninterfaces = [\"{CLIENT_IFACE}\", \"{TARGET_IFACE}\"]\ntarget_interfaces = [\"{TARGET_IFACE}\"]\nflow_insert_limit = 0\n"
    );
    for &(id, vip, port, protocol, group, allowed) in &LISTENERS {
        let protocol = match protocol {
            PROTO_TCP => "tcp",
            PROTO_UDP => "udp",
            other => panic!("fixture listener {id}: protocol {other}"),
        };
        let _ = write!(
            c,
            "\n[[listener]]\nname = \"{}\"\naddress = \"{vip}\"\nport = {port}\nprotocol = \"{protocol}\"\ntarget_group = \"{}\"\n",
            listener_name(id),
            group_name(group)
        );
        if let Some(cidr) = allowed {
            let _ = writeln!(c, "allowed_sources = [\"{cidr}\"]");
        }
    }
    for group in 0..GROUPS {
        let _ = write!(
            c,
            "\n[[target_group]]\nname = \"{}\"\nhash_table_size = {TABLE_SIZE}\n",
            group_name(group)
        );
        if group == STICKY_GROUP {
            c.push_str("stickiness = \"source_ip\"\n");
        }
        for &(_, taddr, tport, _) in TARGETS.iter().filter(|t| t.3 == group) {
            let _ = write!(
                c,
                "\n[[target_group.target]]\naddress = \"{taddr}\"\nport = {tport}\nweight = {WEIGHT}\n"
            );
        }
    }
    c
}

/// Fails unless the model gave every fixture listener, group and target the id the fixtures
/// use.
fn check_ids(model: &Model) -> Result<()> {
    let mut wrong = Vec::new();
    for &(id, ..) in &LISTENERS {
        let got = model.listener_ids.get(&listener_name(id));
        if got != Some(id) {
            wrong.push(format!(
                "listener {}: {got:?}, want {id}",
                listener_name(id)
            ));
        }
    }
    for group in 0..GROUPS {
        let got = model.group_ids.get(&group_name(group));
        if got != Some(group) {
            wrong.push(format!(
                "group {}: {got:?}, want {group}",
                group_name(group)
            ));
        }
    }
    for &(id, taddr, tport, group) in &TARGETS {
        let key = TargetKey {
            group: group_name(group),
            addr: taddr.parse()?,
            port: tport,
        };
        let got = model.target_ids.get(&key);
        if got != Some(id) {
            wrong.push(format!("target {key}: {got:?}, want {id}"));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "the agent's model gave the fixture world other ids than the fixtures use:\n  {}",
            wrong.join("\n  ")
        );
    }
    Ok(())
}

pub struct World {
    pub ebpf: Ebpf,
    pub maps: KernelMaps,
    /// The agent's controller that provisioned the maps (from `config_text`).
    pub controller: Controller,
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
        Self::build(flow_table, "")
    }

    /// As `new`, with `agent.access_log` set: every fixture listener's flows are logged.
    pub fn with_access_log() -> Result<Self> {
        Self::build_with_access_log(4096)
    }

    /// As `with_access_log`, with a flow table of `flow_table` entries.
    pub fn build_with_access_log(flow_table: u32) -> Result<Self> {
        Self::build(flow_table, "access_log = \"/dev/null\"\n")
    }

    /// `agent_keys`: more `[agent]` lines for the fixture config.
    fn build(flow_table: u32, agent_keys: &str) -> Result<Self> {
        let mut ebpf = dataplane::load(MapSizes {
            flow_table,
            table_slots: GROUPS * 2 * TABLE_SIZE,
        })?;
        let mut maps = KernelMaps::new(&mut ebpf)?;
        let controller = provision(&mut maps, agent_keys)?;
        let cookies = controller
            .model
            .targets
            .values()
            .map(|t| (t.id, t.cookie))
            .collect();
        let mut world = Self {
            ebpf,
            maps,
            controller,
            cookies,
        };
        // As in a running agent: FIB answers are reused while the routing state holds.
        world.set_route_epoch(FIXTURE_ROUTE_EPOCH)?;
        Ok(world)
    }

    /// Writes `LB_ROUTE_EPOCH` (what the agent's route watcher keeps).
    pub fn set_route_epoch(&mut self, epoch: u32) -> Result<()> {
        self.maps.route_epoch()?.set(epoch)
    }

    /// `LB_NEXT_HOPS[slot]` of every CPU.
    pub fn next_hops(&self, slot: u32) -> Result<Vec<NextHop>> {
        self.maps.route_epoch()?.next_hop(slot)
    }

    /// Writes `hop` into `LB_NEXT_HOPS[slot]` of every CPU.
    pub fn put_next_hop(&mut self, slot: u32, hop: NextHop) -> Result<()> {
        self.maps.route_epoch()?.put_next_hop(slot, hop)
    }

    /// Sets `flow_insert_limit` (new entries per CPU per second; 0: none).
    pub fn set_insert_limit(&mut self, limit: u32) -> Result<()> {
        let mut config = self.maps.config()?;
        config.flow_insert_limit = limit;
        Ok(self.maps.set_config(&config)?)
    }

    /// Writes target `id` with `state`, `flags` and `cookie` (behind the controller's back).
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

    /// Builds and publishes `group`'s table over `members` (target ids), behind the
    /// controller's back.
    pub fn publish(&mut self, group: u32, members: &[u32]) -> Result<()> {
        let table = group_table(members)?;
        let flags = if group == STICKY_GROUP {
            GROUP_F_STICKY_SOURCE
        } else {
            0
        };
        Ok(self.maps.publish_table(group, flags, &table)?)
    }

    /// The target id the group's table over `members` gives a new flow: predicted from the
    /// fixture constants with lb-common's Maglev and hash (the function the program runs),
    /// not from the agent's desired state.
    pub fn predict(&self, group: u32, members: &[u32], key: &FlowKey) -> u32 {
        let table = group_table(members).expect("table");
        let h = if group == STICKY_GROUP {
            hash::source_hash(HASH_KEY, &key.src_addr)
        } else {
            hash::flow_hash(HASH_KEY, key)
        };
        table[(h % TABLE_SIZE) as usize]
    }

    /// Runs one frame through `lb_xdp` as if received on `ingress`: (action, output frame).
    pub fn run(&mut self, ingress: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog = dataplane::program_mut(&mut self.ebpf, PROGRAM_XDP)?;
        run_prog(prog, ingress, frame)
    }
}

/// Provisions the fixture world through the agent's config loader, controller and reconciler.
fn provision(maps: &mut KernelMaps, agent_keys: &str) -> Result<Controller> {
    let text = config_text().replacen("\n", &format!("\n{agent_keys}"), 1);
    let config = config::parse(&text, "fixtures.toml")
        .with_context(|| format!("the fixture config:\n{text}"))?;
    let interfaces = BTreeMap::from([
        (CLIENT_IFACE.to_string(), crate::lab::ifindex(CLIENT_IFACE)?),
        (TARGET_IFACE.to_string(), crate::lab::ifindex(TARGET_IFACE)?),
    ]);
    let now = Instant::now();
    let mut controller = Controller::new(config, HASH_KEY, interfaces, now)?;
    check_ids(&controller.model)?;
    // No health checks run: every target stays initial, and each group fails open over all
    // its targets.
    controller
        .reconcile(maps, now)
        .context("provisioning the fixture world")?;
    Ok(controller)
}

/// The seed tables are built with: the hash key's two words, high word first.
pub fn table_seed() -> u64 {
    (HASH_KEY[0] as u64) << 32 | HASH_KEY[1] as u64
}

/// The table (target id per slot) of a group of fixture targets, built as every node must build
/// it: members sorted by identity, weight `WEIGHT`, `TABLE_SIZE` slots, seed `table_seed`.
fn group_table(members: &[u32]) -> Result<Vec<u32>> {
    let mut members: Vec<(Vec<u8>, u32)> = members
        .iter()
        .map(|id| {
            let t = TARGETS.iter().find(|t| t.0 == *id).context("target id")?;
            Ok((identity(t.1, t.2), *id))
        })
        .collect::<Result<_>>()?;
    members.sort();
    let backends: Vec<maglev::Backend> = members
        .iter()
        .map(|(identity, _)| maglev::Backend {
            identity,
            weight: WEIGHT,
        })
        .collect();
    let ids: Vec<u32> = members.iter().map(|&(_, id)| id).collect();
    let indices = maglev::build(&backends, TABLE_SIZE, table_seed())?;
    Ok(table_of_ids(&indices, &ids))
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
