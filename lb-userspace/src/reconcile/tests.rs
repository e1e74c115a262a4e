//! The address filter's write order, one case at a time (the property test in
//! `control/converge.rs` covers it under random faults and restarts).

use lb_common::{addr_filter_bucket, VipValue};

use super::*;
use crate::maps::{FakeMaps, Fault, FaultyMaps};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

fn bucket(ip: IpAddr) -> u32 {
    addr_filter_bucket(&addr::to_words(ip).0)
}

/// A desired state of just these VIPs (nothing else is written).
fn vips(ips: &[IpAddr]) -> Desired {
    let vips: BTreeMap<IpAddr, VipValue> = ips
        .iter()
        .map(|&ip| (ip, VipValue { listener_count: 1 }))
        .collect();
    Desired {
        addr_filter: addr_filter_counts(vips.keys(), []),
        vips,
        ..Default::default()
    }
}

/// A second address whose bucket is `a`'s.
fn same_bucket(a: IpAddr) -> IpAddr {
    (0..=u16::MAX)
        .map(|i| IpAddr::from([10, 9, (i >> 8) as u8, i as u8]))
        .find(|&b| b != a && bucket(b) == bucket(a))
        .expect("4096 buckets: a collision among 65536 addresses")
}

fn position(ops: &[String], op: &str) -> usize {
    ops.iter()
        .position(|o| o == op)
        .unwrap_or_else(|| panic!("no {op:?} in {ops:#?}"))
}

#[test]
fn a_count_is_raised_before_its_entry_and_lowered_after_its_removal() {
    let a = ip("10.9.0.10");
    let b = bucket(a);
    let mut maps = FakeMaps::checking();
    let mut r = Reconciler::default();
    r.apply(&vips(&[a]), &mut maps).expect("apply");
    let raise = format!("put_addr_bucket {b} vips=1 targets=0");
    assert!(position(&maps.ops, &raise) < position(&maps.ops, &format!("put_vip {a}")));
    assert_eq!(maps.view().unwrap().addr_filter, vips(&[a]).addr_filter);

    maps.ops.clear();
    r.apply(&vips(&[]), &mut maps).expect("apply");
    let lower = format!("put_addr_bucket {b} vips=0 targets=0");
    assert!(position(&maps.ops, &format!("remove_vip {a}")) < position(&maps.ops, &lower));
    assert!(maps.view().unwrap().addr_filter.is_empty());
    assert!(maps.violations.is_empty(), "{:#?}", maps.violations);
}

/// One VIP replaces another in the same bucket: the count covers both while both may be there.
#[test]
fn a_vip_replacing_another_in_its_bucket_is_counted_with_it() {
    let a = ip("10.9.0.10");
    let c = same_bucket(a);
    let b = bucket(a);
    let mut maps = FakeMaps::checking();
    let mut r = Reconciler::default();
    r.apply(&vips(&[a]), &mut maps).expect("apply");
    maps.ops.clear();
    r.apply(&vips(&[c]), &mut maps).expect("apply");
    assert_eq!(
        maps.ops,
        [
            format!("put_addr_bucket {b} vips=2 targets=0"),
            format!("put_vip {c}"),
            format!("remove_vip {a}"),
            format!("put_addr_bucket {b} vips=1 targets=0"),
        ]
    );
    assert!(maps.violations.is_empty(), "{:#?}", maps.violations);
}

#[test]
fn a_failed_bucket_write_holds_its_entries_back() {
    let a = ip("10.9.0.10");
    let mut maps = FaultyMaps::new(FakeMaps::checking());
    let mut r = Reconciler::default();
    maps.fail_in(0, Fault::Fail);
    let err = r
        .apply(&vips(&[a]), &mut maps)
        .expect_err("the bucket write failed");
    assert!(format!("{err:#}").contains("put_addr_bucket"), "{err:#}");
    // The second write of the bucket (after the removals) is made; the VIP waited for the
    // first.
    assert!(maps.inner.vips.is_empty(), "{:?}", maps.inner.ops);
    r.apply(&vips(&[a]), &mut maps).expect("apply");
    assert!(maps.inner.vips.contains_key(&a));
    assert_eq!(maps.view().unwrap().addr_filter, vips(&[a]).addr_filter);
    assert!(
        maps.inner.violations.is_empty(),
        "{:#?}",
        maps.inner.violations
    );
}

/// A VIP whose write was made but reported failed (in doubt) stays counted until it is
/// removed, though it is no longer desired.
#[test]
fn a_vip_in_doubt_stays_counted_until_removed() {
    let a = ip("10.9.0.10");
    let mut maps = FaultyMaps::new(FakeMaps::checking());
    let mut r = Reconciler::default();
    maps.fail_in(1, Fault::FailAfter); // the bucket write, then the VIP's
    r.apply(&vips(&[a]), &mut maps)
        .expect_err("the VIP write failed");
    assert!(maps.inner.vips.contains_key(&a));
    maps.inner.ops.clear();
    r.apply(&vips(&[]), &mut maps).expect("apply");
    let b = bucket(a);
    assert_eq!(
        maps.inner.ops,
        [
            format!("remove_vip {a}"),
            format!("put_addr_bucket {b} vips=0 targets=0")
        ]
    );
    assert!(
        maps.inner.violations.is_empty(),
        "{:#?}",
        maps.inner.violations
    );
}

/// After a restart the counts are read back: a stale count the earlier run left is lowered, and
/// a held one is not written again.
#[test]
fn an_adopted_filter_is_read_back() {
    let (a, c) = (ip("10.9.0.10"), ip("10.9.0.99"));
    assert_ne!(bucket(a), bucket(c));
    let mut maps = FakeMaps::checking();
    Reconciler::default()
        .apply(&vips(&[a, c]), &mut maps)
        .expect("apply");
    // The earlier run removed `c` and stopped before lowering its count.
    maps.remove_vip(c).expect("remove");
    let mut r = Reconciler::from_view(&maps.view().unwrap());
    maps.ops.clear();
    r.apply(&vips(&[a]), &mut maps).expect("apply");
    assert_eq!(
        maps.ops,
        [format!("put_addr_bucket {} vips=0 targets=0", bucket(c))]
    );
    assert_eq!(maps.view().unwrap(), expected_view(&vips(&[a])).unwrap());
}

/// A removal that failed (the entry may still be there) keeps its count.
#[test]
fn a_failed_removal_keeps_its_count() {
    let a = ip("10.9.0.10");
    let mut maps = FaultyMaps::new(FakeMaps::checking());
    let mut r = Reconciler::default();
    r.apply(&vips(&[a]), &mut maps).expect("apply");
    maps.fail_in(0, Fault::Fail);
    r.apply(&vips(&[]), &mut maps)
        .expect_err("the removal failed");
    assert!(maps.inner.vips.contains_key(&a));
    assert_eq!(maps.view().unwrap().addr_filter, vips(&[a]).addr_filter);
    r.apply(&vips(&[]), &mut maps).expect("apply");
    assert!(maps.view().unwrap().addr_filter.is_empty());
    assert!(
        maps.inner.violations.is_empty(),
        "{:#?}",
        maps.inner.violations
    );
}
