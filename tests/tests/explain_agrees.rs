//! L2: `lb explain` agrees with the datapath. For 1 000 random flows over services of every
//! kind it distinguishes (plain, UDP, session affinity with returning clients, an external
//! frontend with local and remote backends, hence source NAT, and one with no backend),
//! explain's prediction — the backend, source NAT or not, the refusal — is checked against
//! what the real program does to a packet of that flow. Explain applies the datapath's rules
//! on the host (the slot, and `lb_common::rules`: the no-backend verdict, when to
//! source-NAT, when an affinity entry decides): this is where a drift between them shows.

#[macro_use]
mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;
use lb_common::abi::*;
use lb_userspace::dataplane::Dataplane;

const FLOWS: u32 = 1000;

/// xorshift32: the same flows on every run.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
}

const REMOTE: [Be; 4] = [
    Be { id: 1, ip: "198.18.2.1", port: 9376 },
    Be { id: 2, ip: "198.18.2.2", port: 9376 },
    Be { id: 3, ip: "198.18.2.3", port: 9376 },
    Be { id: 4, ip: "198.18.2.4", port: 9376 },
];
const UDP: [Be; 3] = [
    Be { id: 5, ip: "198.18.2.5", port: 53 },
    Be { id: 6, ip: "198.18.2.6", port: 53 },
    Be { id: 7, ip: "198.18.2.7", port: 53 },
];
const STICKY: [Be; 2] =
    [Be { id: 8, ip: "198.18.2.8", port: 8443 }, Be { id: 9, ip: "198.18.2.9", port: 8443 }];
/// The external frontend's backends: the first two on this node, the others not.
const MIXED: [Be; 4] = [
    Be { id: 10, ip: "198.18.1.10", port: 8080 },
    Be { id: 11, ip: "198.18.1.11", port: 8080 },
    Be { id: 12, ip: "198.18.2.12", port: 8080 },
    Be { id: 13, ip: "198.18.2.13", port: 8080 },
];

/// A frontend of the test: address, port, protocol.
type Frontend = (&'static str, u16, u8);
const FRONTENDS: [Frontend; 5] = [
    ("198.19.0.1", 80, PROTO_TCP),
    ("198.19.0.2", 53, PROTO_UDP),
    ("198.19.0.3", 443, PROTO_TCP),
    (NODE4, 30080, PROTO_TCP),
    ("198.19.0.5", 80, PROTO_TCP),
];

fn setup(l: &mut Loaded) {
    l.dp.set_config(&Config { snat_v4: addr_from_ip(ip(NODE4)), ..Config::default() }).unwrap();
    program(&mut l.dp, 1, FRONTENDS[0], &REMOTE, 0, 0);
    let size = program(&mut l.dp, 2, FRONTENDS[1], &UDP, 4096, 0).value.maglev_size;
    program(&mut l.dp, 3, FRONTENDS[2], &STICKY, 4096 + size, SVC_F_AFFINITY);
    program(&mut l.dp, 4, FRONTENDS[3], &MIXED, 12_288, SVC_F_EXTERNAL);
    for b in &MIXED[..2] {
        l.dp.set_backend(b.id, &BackendValue::new(ip(b.ip), b.port, BE_F_PRESENT | BE_F_LOCAL)).unwrap();
    }
    program(&mut l.dp, 5, FRONTENDS[4], &[], 16_384, 0);
}

/// What explain says the datapath will do.
#[derive(Debug, PartialEq)]
enum Predicted {
    /// Translated to this backend, with the source NATed to this address (or kept).
    To {
        backend: String,
        snat: Option<IpAddr>,
    },
    Refused,
}

fn predict(lines: &[String]) -> Predicted {
    if lines.iter().any(|l| l.contains("refused")) {
        return Predicted::Refused;
    }
    let picked = lines.iter().find_map(|l| l.strip_prefix("picked: backend ")).expect("a pick");
    let backend = picked.split_whitespace().nth(1).unwrap().to_string();
    let snat = lines
        .iter()
        .find_map(|l| l.strip_prefix("source NAT to "))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap());
    assert!(snat.is_some() || lines.iter().any(|l| l.contains("client address kept")), "{lines:#?}");
    Predicted::To { backend, snat }
}

#[test]
fn explain_predicts_what_the_datapath_does_for_1000_random_flows() {
    require_root!();
    let mut l = Loaded::new();
    setup(&mut l);
    let mut rng = Rng(0x9e37_79b9);
    let (mut translated, mut natted, mut refused, mut sticky) = (0, 0, 0, 0);
    for i in 0..FLOWS {
        let (vip, port, proto) = FRONTENDS[(rng.next() % FRONTENDS.len() as u32) as usize];
        // A fresh client for each flow, but for the affinity service: 16 clients come back
        // there, so their affinity entries decide (explain reads them).
        let client = if port == 443 {
            Ipv4Addr::new(198, 18, 127, (rng.next() % 16) as u8 + 1).to_string()
        } else {
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i).to_string()
        };
        let sport = 1024 + (rng.next() % 60_000) as u16;
        let dst = format!("{vip}:{port}/{}", if proto == PROTO_UDP { "udp" } else { "tcp" });
        let lines = lb_userspace::explain::explain(&l.dp, &format!("{client}:{sport}"), &dst).unwrap();
        sticky += lines.iter().any(|l| l.contains("this client's entry decides")) as u32;
        let spec = if proto == PROTO_UDP {
            Spec::udp(&client, sport, vip, port)
        } else {
            Spec::tcp(&client, sport, vip, port)
        };
        let (rc, out) = l.run_xdp(&spec.build());
        let seen = inspect(&out);
        match predict(&lines) {
            Predicted::Refused => {
                assert_eq!(rc, XDP_TX, "flow {i}: refused, as explain said:\n{lines:#?}");
                refused += 1;
            }
            Predicted::To { backend, snat } => {
                assert_eq!(rc, XDP_PASS, "flow {i}: {lines:#?}");
                assert_eq!(
                    format!("{}:{}", seen.dst, seen.dport),
                    backend,
                    "flow {i}: the backend:\n{lines:#?}"
                );
                let src = snat.unwrap_or(ip(&client));
                assert_eq!(seen.src, src, "flow {i}: the source:\n{lines:#?}");
                translated += 1;
                natted += snat.is_some() as u32;
            }
        }
    }
    eprintln!(
        "{FLOWS} flows: {translated} translated as explained ({natted} source-NATed, {sticky} by an affinity entry), {refused} refused"
    );
    assert!(
        natted > 50 && refused > 100 && sticky > 100 && translated - natted > 500,
        "every kind of flow was drawn"
    );
}
