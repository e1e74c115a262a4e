//! Leaf values of the config: durations with units, ports, status-code matchers, CIDR prefixes.
//! Each parses from its TOML text with a message that says what was expected.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Implements Deserialize (from a string) and Serialize (to its Display form) through FromStr.
macro_rules! string_value {
    ($ty:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$ty, E> {
                        s.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

/// A duration written with a unit: `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"1m30s"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // humantime reads "500ms", "10s", "5m", "1h", "1m30s" (and longer units); a bare
        // number, a sign or a fraction is no duration.
        humantime::parse_duration(s).map(Self).map_err(|e| {
            format!("{s:?} is not a duration ({e}): expected a number with a unit, like \"500ms\", \"10s\", \"5m\"")
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

string_value!(Duration, "a duration string with a unit, like \"10s\"");

/// A TCP/UDP port, 1..=65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        port_number(n).map(Port).map_err(de::Error::custom)
    }
}

fn port_number(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("port {n} is outside 1..=65535")),
    }
}

/// `health_check.port`: the target's own port, or a fixed one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthCheckPort {
    #[default]
    TrafficPort,
    Port(u16),
}

impl HealthCheckPort {
    pub fn resolve(self, traffic_port: u16) -> u16 {
        match self {
            Self::TrafficPort => traffic_port,
            Self::Port(p) => p,
        }
    }
}

impl<'de> Deserialize<'de> for HealthCheckPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = HealthCheckPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"traffic-port\" or a port number")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<HealthCheckPort, E> {
                match s {
                    "traffic-port" => Ok(HealthCheckPort::TrafficPort),
                    _ => match s.parse::<i64>() {
                        Ok(n) => port_number(n).map(HealthCheckPort::Port).map_err(E::custom),
                        Err(_) => Err(E::custom(format!(
                            "{s:?}: expected \"traffic-port\" or a port number"
                        ))),
                    },
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<HealthCheckPort, E> {
                port_number(n).map(HealthCheckPort::Port).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<HealthCheckPort, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for HealthCheckPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::TrafficPort => s.serialize_str("traffic-port"),
            Self::Port(p) => s.serialize_u16(*p),
        }
    }
}

/// HTTP status codes a health check accepts: `"200"`, `"200-399"`, `"200,202,300-399"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher {
    ranges: Vec<(u16, u16)>,
}

impl Default for Matcher {
    fn default() -> Self {
        Self {
            ranges: vec![(200, 399)],
        }
    }
}

impl Matcher {
    pub fn matches(&self, status: u16) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl FromStr for Matcher {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let code = |t: &str| -> Result<u16, String> {
            match t.trim().parse::<u16>() {
                Ok(c) if (200..=599).contains(&c) => Ok(c),
                _ => Err(format!(
                    "matcher {s:?}: {t:?} is not an HTTP status code in 200..=599"
                )),
            }
        };
        let mut ranges = Vec::new();
        for part in s.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (code(lo)?, code(hi)?),
                None => {
                    let c = code(part)?;
                    (c, c)
                }
            };
            if lo > hi {
                return Err(format!("matcher {s:?}: range {lo}-{hi} is empty"));
            }
            ranges.push((lo, hi));
        }
        Ok(Self { ranges })
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

string_value!(
    Matcher,
    "HTTP status codes, like \"200-399\" or \"200,202\""
);

/// An address prefix, `10.0.0.0/8` or `2001:db8::/32` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let net = if let Some((a, _)) = s.split_once('/') {
            s.parse::<ipnet::IpNet>()
                .map_err(|_| match a.parse::<IpAddr>() {
                    Ok(IpAddr::V4(_)) => {
                        format!("{s:?} is not a CIDR prefix: length must be 0..=32")
                    }
                    Ok(IpAddr::V6(_)) => {
                        format!("{s:?} is not a CIDR prefix: length must be 0..=128")
                    }
                    Err(_) => format!("{s:?} is not a CIDR prefix: {a:?} is not an IP address"),
                })?
        } else {
            let addr: IpAddr = s
                .parse()
                .map_err(|_| format!("{s:?} is not a CIDR prefix: {s:?} is not an IP address"))?;
            ipnet::IpNet::from(addr)
        };
        if net.trunc() != net {
            return Err(format!(
                "{s:?} has host bits set after /{}",
                net.prefix_len()
            ));
        }
        Ok(Self {
            addr: net.addr(),
            len: net.prefix_len(),
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

string_value!(Cidr, "a CIDR prefix string, like \"10.0.0.0/8\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s: &str| s.parse::<Duration>().map(|d| d.0.as_millis());
        assert_eq!(d("500ms"), Ok(500));
        assert_eq!(d("10s"), Ok(10_000));
        assert_eq!(d("5m"), Ok(300_000));
        assert_eq!(d("1h"), Ok(3_600_000));
        assert_eq!(d("1m30s"), Ok(90_000));
        assert_eq!(d("0s"), Ok(0));
        // humantime's grammar: fractions and a space before the unit are fine.
        assert_eq!(d("1.5s"), Ok(1500));
        assert_eq!(d("10 s"), Ok(10_000));
        for bad in ["", "10", "s", "10x", "-1s", "99999999999999999999s"] {
            assert!(d(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Duration::from_secs(10).to_string(), "10s");
        assert_eq!("1500ms".parse::<Duration>().unwrap().to_string(), "1500ms");
    }

    #[test]
    fn matchers() {
        let m: Matcher = "200,202,300-399".parse().unwrap();
        assert!(m.matches(200) && m.matches(202) && m.matches(300) && m.matches(399));
        assert!(!m.matches(201) && !m.matches(400) && !m.matches(500));
        assert_eq!(m.to_string(), "200,202,300-399");
        let d = Matcher::default();
        assert!(d.matches(200) && d.matches(399) && !d.matches(400) && !d.matches(199));
        for bad in [
            "", "abc", "200-", "-200", "399-200", "100", "600", "200,,300", "2OO",
        ] {
            assert!(bad.parse::<Matcher>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!((c.addr, c.len), ("10.0.0.0".parse().unwrap(), 8));
        assert_eq!("::/0".parse::<Cidr>().unwrap().len, 0);
        assert_eq!("fd00::1".parse::<Cidr>().unwrap().len, 128);
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().len, 32);
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0.0/",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} accepted");
        }
    }
}
