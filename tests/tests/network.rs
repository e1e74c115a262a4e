//! Real networks around the balancer: a narrow link behind a router (path MTU discovery through
//! the VIP), a balancer whose client side is narrower than its target side, a packet forged
//! from the client side with a target's source, fragmented UDP replies, ICMP errors from a
//! target, and an 802.1Q-tagged client side. Each test runs on its own topology
//! (`lb_tests::topology`) with the real agent and real clients, and checks first what does not
//! depend on the balancer's XDP program (the path works without it), so that a failure says
//! what the balancer did wrong.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use lb_tests::{
    harness::{config, listener_group, poll, Balancer, Datagram, URL},
    topology::{backend_addr, backend_addr6, Options, CLIENT, CLIENT6, VIP, VIP6},
};

/// 2 MB: about 1,400 full-sized segments.
const SIZE: u64 = 2_000_000;
/// The router's client-facing MTU, and the balancer's client-side MTU (test 2).
const NARROW: u32 = 1400;

/// The data plane's non-zero counters, for the output.
fn counters(b: &Balancer) -> String {
    b.counters_text()
        .unwrap_or_else(|e| format!("(counters unreadable: {e})"))
}

/// The MTU of `dev` on host `host`.
fn mtu(b: &Balancer, host: &str, dev: &str) -> Result<u32> {
    let out = b
        .topo
        .exec(host, &format!("cat /sys/class/net/{dev}/mtu"))?;
    Ok(out.trim().parse()?)
}

/// Client ═ router (its side 1400) ═ balancer ═ backends. b1 is the listener's only target;
/// b2 is not a target, so traffic to it is none of the balancer's business: downloading from
/// it directly shows that the router sends "fragmentation needed" / "packet too big" and that
/// path MTU discovery works on this path without the XDP program's help (and leaves b1 with
/// no path MTU learnt). Then 2 MB through the VIP: the router's ICMP goes to the VIP, and
/// the balancer must hand it to b1.
fn pmtu_through_a_narrow_router_link(v6: bool) -> Result<()> {
    let (vip, target, direct, icmp_counter) = if v6 {
        (
            format!("[{VIP6}]"),
            backend_addr6(1),
            format!("[{}]", backend_addr6(2)),
            "Icmp6OutPktTooBigs",
        )
    } else {
        (
            VIP.to_string(),
            backend_addr(1),
            backend_addr(2),
            "IcmpOutDestUnreachs",
        )
    };
    let mut c = config(1, "", "", "", "");
    if v6 {
        c.push_str(&listener_group(
            "web6",
            VIP6,
            80,
            "tcp",
            std::slice::from_ref(&target),
            8080,
            8080,
        ));
    }
    let b = Balancer::with_backends(
        Options {
            backends: 2,
            router_mtu: Some(NARROW),
            ..Options::default()
        },
        &c,
    )?;
    b.wait_healthy(if v6 { 2 } else { 1 })?;
    // The narrow hop is the router's side of the client link; the client advertises MSS 1460.
    assert_eq!(mtu(&b, "rt", "r0")?, NARROW);
    assert_eq!(mtu(&b, "cli", "c0")?, 1500);
    assert_eq!(mtu(&b, "rt", "r1")?, 1500);
    assert_eq!(mtu(&b, "lb", "l0")?, 1500);

    let icmp_before = b.topo.snmp("rt", icmp_counter)?;
    let d = b.download(&format!("http://{direct}:8080/bytes?n={SIZE}"), 15)?;
    let icmp_direct = b.topo.snmp("rt", icmp_counter)? - icmp_before;
    println!(
        "direct from b2 (no balancing): {} bytes in {:.2} s (curl exit {}); the router sent {icmp_direct} {icmp_counter}",
        d.bytes, d.seconds, d.exit
    );
    assert_eq!((d.exit, d.http_code, d.bytes), (0, 200, SIZE), "{d:?}");
    assert!(
        icmp_direct >= 1,
        "the router sent no {icmp_counter}: the path does not exercise PMTU discovery"
    );

    let d = b.download(&format!("http://{vip}/bytes?n={SIZE}"), 15)?;
    let icmp_vip = b.topo.snmp("rt", icmp_counter)? - icmp_before - icmp_direct;
    println!(
        "through the VIP {vip} to {target}: {} of {SIZE} bytes in {:.2} s (curl exit {}, HTTP {}); the router sent {icmp_vip} {icmp_counter} to the VIP; {}",
        d.bytes,
        d.seconds,
        d.exit,
        d.http_code,
        counters(&b)
    );
    assert_eq!(
        b.topo.log("backend-b1").matches(" /bytes").count(),
        1,
        "the request did not reach b1 exactly once"
    );
    assert_eq!(
        (d.exit, d.http_code, d.bytes),
        (0, 200, SIZE),
        "the download through the VIP stalled: the router's {icmp_counter} to the VIP did not reach the target"
    );
    Ok(())
}

#[test]
fn pmtu_through_a_narrow_router_link_v4() -> Result<()> {
    pmtu_through_a_narrow_router_link(false)
}

#[test]
fn pmtu_through_a_narrow_router_link_v6() -> Result<()> {
    pmtu_through_a_narrow_router_link(true)
}

/// The balancer's client-side interface l0 is 1400 (the client's c0 1500, MSS 1460), its
/// target side 1500: a target's full-sized segments do not fit l0, and the balancer's own
/// kernel must tell the target so ("fragmentation needed", quoting the target's own packet):
/// the program leaves such a reply untranslated to the stack. Translated first, the kernel's
/// ICMP would go to the VIP instead and the download would stall.
#[test]
fn reply_too_big_for_the_balancers_egress() -> Result<()> {
    let b = Balancer::with_backends(
        Options {
            backends: 2,
            balancer_client_mtu: Some(NARROW),
            ..Options::default()
        },
        &config(1, "", "", "", ""),
    )?;
    b.wait_healthy(1)?;
    assert_eq!(mtu(&b, "lb", "l0")?, NARROW);
    assert_eq!(mtu(&b, "cli", "c0")?, 1500);
    // Direct from b2 (not a target): the balancer's stack forwards and sends frag-needed.
    let icmp_before = b.topo.snmp("lb", "IcmpOutDestUnreachs")?;
    let d = b.download(
        &format!("http://{}:8080/bytes?n={SIZE}", backend_addr(2)),
        15,
    )?;
    let icmp_direct = b.topo.snmp("lb", "IcmpOutDestUnreachs")? - icmp_before;
    println!(
        "direct from b2 (no balancing): {} bytes in {:.2} s (curl exit {}); the balancer sent {icmp_direct} frag-needed",
        d.bytes, d.seconds, d.exit
    );
    assert_eq!((d.exit, d.http_code, d.bytes), (0, 200, SIZE), "{d:?}");
    assert!(icmp_direct >= 1, "the balancer sent no frag-needed to b2");

    let d = b.download(&format!("{URL}bytes?n={SIZE}"), 15)?;
    let icmp_vip = b.topo.snmp("lb", "IcmpOutDestUnreachs")? - icmp_before - icmp_direct;
    println!(
        "through the VIP to b1: {} of {SIZE} bytes in {:.2} s (curl exit {}, HTTP {}); the balancer sent {icmp_vip} frag-needed; {}",
        d.bytes,
        d.seconds,
        d.exit,
        d.http_code,
        counters(&b)
    );
    assert_eq!(
        (d.exit, d.http_code, d.bytes),
        (0, 200, SIZE),
        "the download through the VIP stalled: nobody told the target that its segments do not fit the balancer's client side"
    );
    assert!(
        icmp_vip >= 1,
        "the balancer sent no frag-needed during the download: the test did not exercise the narrow egress"
    );
    Ok(())
}

/// A client's UDP datagram with DF set, too big for the balancer's target side (1,400): the
/// balancer answers "fragmentation needed" from the VIP about the client's own datagram, so
/// the client's kernel lowers its path MTU toward the VIP (and refuses the next big send).
/// Handed to the stack instead, the error would quote the translated datagram (to the
/// target), which the client cannot match: it would keep sending datagrams that vanish.
#[test]
fn too_big_for_the_target_side_tells_the_client() -> Result<()> {
    let mut c = config(1, "", "", "", "");
    c.push_str(&listener_group(
        "echo",
        VIP,
        5300,
        "udp",
        &[backend_addr(1)],
        5300,
        8080,
    ));
    let mut b = Balancer::with_backends(
        Options {
            backends: 1,
            balancer_target_mtu: Some(NARROW),
            ..Options::default()
        },
        &c,
    )?;
    // The error leaves with XDP_TX, and a veth wakes its peer for XDP_TX only when the peer
    // runs an XDP program (README, "Topologies"); a NIC needs nothing.
    b.topo.attach_xdp_pass("cli", "c0")?;
    b.wait_healthy(2)?;
    assert_eq!(mtu(&b, "lb", "l1")?, NARROW);
    // Sends 1,450 bytes with DF (IP_PMTUDISC_DO) up to 5 times, 0.5 s apart; prints the
    // socket's path MTU once the kernel knows better than the link's 1500, or "none".
    let out = b.topo.python(
        "cli",
        "too-big",
        &format!(
            r#"
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
s.connect(("{VIP}", 5300))
for i in range(5):
    try:
        s.send(b"x" * 1450)
    except OSError as e:
        print("refused", e.errno, s.getsockopt(socket.IPPROTO_IP, 14))  # IP_MTU
        break
    time.sleep(0.5)
else:
    print("none", s.getsockopt(socket.IPPROTO_IP, 14))
"#
        ),
    )?;
    println!(
        "client sending 1450 bytes with DF to the VIP: {}; {}",
        out.trim(),
        counters(&b)
    );
    let fields: Vec<&str> = out.split_whitespace().collect();
    ensure!(
        fields.first() == Some(&"refused") && fields.get(2) == Some(&"1400"),
        "the client never learned the path MTU toward the VIP: {out}"
    );
    Ok(())
}

/// A datagram from the client side whose source is forged to be a target endpoint (b1's
/// 10.0.2.11:5300), sent to another backend: it is not a reply from a target (it did not come
/// from the targets' side), so it must not be reverse-NATed to the VIP. Routed untouched
/// (b2 sees the forged source) or dropped are both fine.
#[test]
fn forged_target_source_from_the_client_side_is_not_reverse_natted() -> Result<()> {
    let mut c = config(2, "", "", "", "");
    c.push_str(&listener_group(
        "echo",
        VIP,
        5300,
        "udp",
        &[backend_addr(1), backend_addr(2)],
        5300,
        8080,
    ));
    let b = Balancer::with_backends(
        Options {
            backends: 2,
            ..Options::default()
        },
        &c,
    )?;
    b.wait_healthy(4)?;
    let sink = |b: &Balancer| -> Vec<String> {
        b.topo
            .log("backend-b2")
            .lines()
            .filter(|l| l.starts_with("b2 sink "))
            .map(String::from)
            .collect()
    };
    // A genuine datagram from the client to b2's sink arrives with the client's source.
    b.topo.python(
        "cli",
        "control",
        &format!(
            "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'control', ('{}', 5399))\n",
            backend_addr(2)
        ),
    )?;
    poll(Duration::from_secs(3), "the control datagram at b2", || {
        Ok(sink(&b)
            .iter()
            .any(|l| l.starts_with(&format!("b2 sink {CLIENT} ")) && l.ends_with(" control"))
            .then_some(()))
    })?;
    // Five datagrams with a forged source: IPv4 and UDP headers built by hand (raw socket).
    let forged = format!(
        r#"import socket, struct
def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
src, dst = socket.inet_aton("{src}"), socket.inet_aton("{dst}")
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for i in range(5):
    data = b"forged %d" % i
    ulen = 8 + len(data)
    udp = struct.pack("!HHHH", 5300, 5399, ulen, 0) + data
    c = csum(src + dst + struct.pack("!BBH", 0, 17, ulen) + udp) or 0xffff
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0x4000 + i, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    raw.sendto(ip + udp, ("{dst}", 0))
"#,
        src = backend_addr(1),
        dst = backend_addr(2)
    );
    b.topo.python("cli", "forged", &forged)?;
    // Watch b2 for 2 s (ending early at the first datagram from the VIP).
    let from_vip = format!("b2 sink {VIP} ");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2)
        && !sink(&b).iter().any(|l| l.starts_with(&from_vip))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = sink(&b);
    let forged: Vec<&String> = lines.iter().filter(|l| l.contains(" forged ")).collect();
    println!(
        "b2 received {} of 5 forged datagrams: {forged:?}",
        forged.len()
    );
    for l in &forged {
        assert!(
            l.starts_with(&format!("b2 sink {} 5300 ", backend_addr(1))),
            "a forged datagram from the client side left the balancer rewritten: {l}"
        );
    }
    Ok(())
}

/// The echo's "big 3000" answer is 3,000 bytes: b1's own stack fragments it (MTU 1500). b2,
/// not a target, shows first that the fragments cross the balancer's stack and reassemble at
/// the client; a short datagram through the VIP that the listener works.
fn fragmented_udp_reply(v6: bool) -> Result<()> {
    let (vip, client, b1, b2) = if v6 {
        (VIP6, CLIENT6, backend_addr6(1), backend_addr6(2))
    } else {
        (VIP, CLIENT, backend_addr(1), backend_addr(2))
    };
    let mut c = config(1, "", "", "", "");
    c.push_str(&listener_group(
        "echo",
        vip,
        5300,
        "udp",
        std::slice::from_ref(&b1),
        5300,
        8080,
    ));
    let b = Balancer::with_backends(
        Options {
            backends: 2,
            ..Options::default()
        },
        &c,
    )?;
    b.wait_healthy(2)?;
    let wait = Duration::from_secs(3);
    // Exactly one datagram, from `source`:5300, of `len` bytes (if given), from `name`'s echo.
    let one = |got: &[Datagram], source: &str, len: Option<usize>, name: &str| {
        got.len() == 1
            && got[0].source == source
            && got[0].port == 5300
            && len.is_none_or(|n| got[0].len == n)
            && got[0].head.starts_with(&format!("{name} saw {client} "))
    };
    let direct = b.udp_exchange(&b2, 5300, "big 3000", wait)?;
    println!("direct from b2: {direct:?}");
    ensure!(
        one(&direct, &b2, Some(3000), "b2"),
        "the fragmented reply of b2 (no balancing) did not arrive whole: {direct:?}"
    );
    let small = b.udp_exchange(vip, 5300, "ping", wait)?;
    println!("small through the VIP: {small:?}");
    ensure!(
        one(&small, vip, None, "b1"),
        "a short datagram through the VIP: {small:?}"
    );
    let big = b.udp_exchange(vip, 5300, "big 3000", wait)?;
    println!("big through the VIP: {big:?}; {}", counters(&b));
    assert!(
        one(&big, vip, Some(3000), "b1"),
        "expected one 3000-byte datagram from {vip}:5300, got {big:?}"
    );
    Ok(())
}

#[test]
fn fragmented_udp_reply_reaches_the_client_from_the_vip() -> Result<()> {
    fragmented_udp_reply(false)
}

#[test]
fn fragmented_udp_reply_reaches_the_client_from_the_vip_v6() -> Result<()> {
    fragmented_udp_reply(true)
}

/// A connected UDP socket sends to `addr:port` up to six times, half a second apart, until
/// the kernel reports the port unreachable: "refused SENDS SECONDS", else "timeout …".
fn connected_udp(b: &Balancer, addr: &str, port: u16) -> Result<String> {
    let out = b.topo.python(
        "cli",
        "connected_udp",
        &format!(
            r#"import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("{addr}", {port}))
s.settimeout(0.5)
start = time.monotonic()
for i in range(6):
    try:
        s.send(b"anyone there %d" % i)
        data = s.recv(2048)
        print("reply %d %r" % (i + 1, data[:40]))
        break
    except ConnectionRefusedError:
        print("refused %d %.3f" % (i + 1, time.monotonic() - start))
        break
    except socket.timeout:
        pass
else:
    print("timeout 6 %.3f" % (time.monotonic() - start))
"#
        ),
    )?;
    Ok(out.trim().to_string())
}

/// Nothing listens on port 5301 of the targets: b1 answers ICMP port unreachable about the
/// client's datagram to 10.0.2.11:5301; the client, which sent to VIP:5301, recognises it only
/// if the balancer sends it on from the VIP, quoting the VIP. The group is checked by TCP on
/// 8080 so that b1 is healthy.
#[test]
fn target_port_unreachable_reaches_the_client() -> Result<()> {
    let mut c = config(1, "", "", "", "");
    c.push_str(&listener_group(
        "unreach",
        VIP,
        5301,
        "udp",
        &[backend_addr(1)],
        5301,
        8080,
    ));
    let b = Balancer::with_backends(
        Options {
            backends: 2,
            ..Options::default()
        },
        &c,
    )?;
    b.wait_healthy(2)?;
    let direct = connected_udp(&b, &backend_addr(2), 5301)?;
    println!("direct to b2:5301 (no balancing): {direct}");
    ensure!(
        direct.starts_with("refused "),
        "b2's port unreachable did not reach the client: {direct}"
    );
    let b1_icmp = b.topo.snmp("b1", "IcmpOutDestUnreachs")?;
    let via = connected_udp(&b, VIP, 5301)?;
    let b1_icmp = b.topo.snmp("b1", "IcmpOutDestUnreachs")? - b1_icmp;
    println!(
        "through the VIP to b1:5301: {via}; b1 sent {b1_icmp} port unreachable; {}",
        counters(&b)
    );
    ensure!(
        b1_icmp >= 1,
        "b1 answered no port unreachable: the datagrams did not reach it"
    );
    assert!(
        via.starts_with("refused "),
        "the client's connected socket saw no ECONNREFUSED: b1's port unreachable did not come back from the VIP ({via})"
    );
    Ok(())
}

/// The client side is VLAN 100: c0.100 ═ l0.100, XDP on l0 sees tagged frames. The backends
/// have no VLAN: they answer only if the balancer sends them untagged frames.
#[test]
fn vlan_tagged_client_side() -> Result<()> {
    let b = Balancer::with_backends(
        Options {
            backends: 2,
            client_vlan: Some(100),
            ..Options::default()
        },
        &config(1, "", "", "", ""),
    )?;
    b.wait_healthy(1)?;
    // b2 (not a target) directly: the tagged client side works through the balancer's stack.
    let (counts, seen) = b.spread(&format!("http://{}:8080/", backend_addr(2)), 3)?;
    println!("direct to b2 (no balancing): {counts:?}, seen {seen:?}");
    ensure!(
        counts.get("b2") == Some(&3) && seen == [CLIENT.to_string()].into(),
        "the VLAN path without balancing: {counts:?} {seen:?}"
    );
    let dropped = b.topo.otherhost_drops("b1", "e0")?;
    let (counts, seen) = b.spread(URL, 10)?;
    println!(
        "through the VIP: {counts:?}, seen {seen:?}; b1 dropped {} frames as for another host (tagged frames count there); {}",
        b.topo.otherhost_drops("b1", "e0")? - dropped,
        counters(&b)
    );
    assert_eq!(counts.get("ERR"), None, "{counts:?}");
    assert_eq!(seen, [CLIENT.to_string()].into());
    Ok(())
}
