//! The daemon end to end, in namespaces (root): HTTP over TCP from the
//! internet host to a customer server through `moat run` and back through
//! the tunnel; an invalid reload that changes nothing; a reload that adds a
//! customer; metrics; a restart under continuous traffic with zero loss;
//! `moat down`.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use moat_lab::{daemon::Daemon, edge::Edge, http};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_moat");

fn status(d: &Daemon) -> Value {
    d.status().unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
}

fn customers(s: &Value) -> BTreeSet<String> {
    s["customers"]
        .as_array()
        .expect("customers")
        .iter()
        .map(|c| c["name"].as_str().expect("name").to_string())
        .collect()
}

fn metric(text: &str, name_and_labels: &str) -> u64 {
    http::metric(text, name_and_labels).unwrap_or_else(|| panic!("no metric {name_and_labels} in\n{text}"))
}

#[test]
fn daemon_end_to_end() {
    let edge = Edge::new("e2e").expect("topology");
    let mut d = Daemon::start(Path::new(BIN), &edge.node, &Edge::config_yaml(&[(0, 42)])).expect("moat run");
    let _site1 = edge.start_site(0, Some(42)).expect("site 1 endpoint");
    let stop = Arc::new(AtomicBool::new(false));
    let server1 = http::serve(&edge.sites[0].ns, edge.sites[0].server, stop.clone()).expect("server 1");

    // HTTP through moat and back through the tunnel.
    assert_eq!(http::get_many(&edge.inet, edge.sites[0].server, 20), 20, "{}", d.log());
    let s = status(&d);
    assert_eq!(s["generation"], 1);
    assert_eq!(s["data_plane"]["opened"], "loaded");
    assert_eq!(s["data_plane"]["consistent"], true, "{s:#}");
    assert_eq!(customers(&s), BTreeSet::from(["acme".to_string()]));
    for i in s["interfaces"].as_array().expect("interfaces") {
        assert_eq!(i["attached"], true, "{i}");
        assert_eq!(i["mode"], "native", "{i}");
    }
    let acme = &s["customers"][0];
    assert!(acme["counters"]["in_forwarded"]["packets"].as_u64().expect("counter") >= 20);
    assert!(acme["counters"]["out_forwarded"]["packets"].as_u64().expect("counter") >= 20);
    assert_eq!(acme["prefixes"], serde_json::json!(["203.0.113.0/25"]));
    let tunnel = &s["tunnels"][0];
    assert_eq!(
        (tunnel["name"].as_str(), tunnel["key"].as_u64()),
        (Some("acme-site"), Some(42))
    );
    assert!(
        tunnel["next_hop"].as_str().expect("next hop").starts_with("ifindex"),
        "{tunnel}"
    );
    let program = s["data_plane"]["program_id"].clone();

    // An invalid reload changes nothing.
    let bad = Edge::config_yaml(&[(0, 42)]).replace("203.0.113.0/25]", "203.0.113.1/25]");
    d.write_config(&bad).expect("write");
    let out = d.cli(&["reload"]).expect("moat reload");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an invalid reload must fail");
    assert!(
        stderr.contains(&format!("{}:", d.config.display()))
            && stderr.contains("error: ")
            && stderr.contains("203.0.113.0/25"),
        "errors must be FILE:LINE:COL with the hint: {stderr}"
    );
    let s2 = status(&d);
    assert_eq!(s2["generation"], 1);
    assert_eq!(s2["last_reload"]["result"], "rejected");
    assert_eq!(s2["data_plane"]["consistent"], true);
    assert_eq!(s2["customers"][0]["prefixes"], s["customers"][0]["prefixes"]);
    assert_eq!(s2["tunnels"][0]["id"], s["tunnels"][0]["id"]);
    assert_eq!(http::get_many(&edge.inet, edge.sites[0].server, 5), 5);

    // A reload that adds a customer, by SIGHUP this time.
    d.write_config(&Edge::config_yaml(&[(0, 42), (1, 7)])).expect("write");
    d.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&d)["generation"] != 2 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let s3 = status(&d);
    assert_eq!(s3["last_reload"]["result"], "ok");
    assert_eq!(
        customers(&s3),
        BTreeSet::from(["acme".to_string(), "globex".to_string()])
    );
    assert_eq!(s3["data_plane"]["consistent"], true);
    let _site2 = edge.start_site(1, Some(7)).expect("site 2 endpoint");
    let server2 = http::serve(&edge.sites[1].ns, edge.sites[1].server, stop.clone()).expect("server 2");
    assert_eq!(http::get_many(&edge.inet, edge.sites[1].server, 10), 10, "{}", d.log());

    // Metrics: generation, reasons, per-customer and per-tunnel counters.
    let m = http::scrape_metrics(&edge.node).expect("metrics");
    assert_eq!(metric(&m, "moat_config_generation"), 2);
    assert_eq!(metric(&m, "moat_last_reload_success"), 1);
    assert!(metric(&m, "moat_reason_packets_total{reason=\"forward_encap\"}") >= 35);
    assert!(
        metric(
            &m,
            "moat_customer_packets_total{customer=\"globex\",direction=\"in\",result=\"forwarded\"}"
        ) >= 10
    );
    assert!(
        metric(
            &m,
            "moat_tunnel_packets_total{customer=\"acme\",tunnel=\"acme-site\",direction=\"rx\"}"
        ) >= 25
    );
    assert!(m.contains("moat_build_info{"), "{m}");

    // Next hops follow the kernel: a changed neighbour reaches the tunnel
    // entry at once; a deleted one is resolved again by the kernel (managed
    // entry) and traffic flows again.
    let next_hop = |d: &Daemon| {
        status(d)["tunnels"]
            .as_array()
            .expect("tunnels")
            .iter()
            .find(|t| t["name"] == "acme-site")
            .map(|t| t["next_hop"].as_str().unwrap_or_default().to_string())
            .expect("acme-site")
    };
    let real = next_hop(&d);
    let wait_for = |what: &str, ok: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let hop = next_hop(&d);
            if ok(&hop) {
                return hop;
            }
            assert!(Instant::now() < deadline, "{what}: next hop still {hop}\n{}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    edge.node.ip(&[
        "neigh",
        "replace",
        "192.0.2.10",
        "lladdr",
        "02:00:00:00:be:ef",
        "dev",
        "n-site1",
        "nud",
        "permanent",
    ]);
    wait_for("neighbour changed", &|h| h.contains("02:00:00:00:be:ef"));
    edge.node.ip(&["neigh", "del", "192.0.2.10", "dev", "n-site1"]);
    let again = wait_for("neighbour deleted", &|h| {
        h.starts_with("ifindex") && !h.contains("be:ef")
    });
    assert_eq!(again, real);
    assert_eq!(http::get_many(&edge.inet, edge.sites[0].server, 5), 5);
    assert!(d.log().contains("next hop changed"), "{}", d.log());

    // Restart under continuous traffic: not one packet lost.
    let receiver = {
        let _in = edge.sites[0].ns.enter().expect("enter site");
        UdpSocket::bind((edge.sites[0].server, 9000)).expect("bind")
    };
    receiver
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let sender = {
        let _in = edge.inet.enter().expect("enter inet");
        UdpSocket::bind("198.51.100.100:0").expect("bind")
    };
    let counting = std::thread::spawn(move || {
        let mut seen = BTreeSet::new();
        let mut buf = [0u8; 64];
        let mut idle = 0;
        while idle < 10 {
            match receiver.recv(&mut buf) {
                Ok(8) => {
                    seen.insert(u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")));
                    idle = 0;
                }
                Ok(_) => {}
                Err(_) => idle += 1,
            }
        }
        seen
    });
    let sending = Arc::new(AtomicBool::new(true));
    let flag = sending.clone();
    let target = SocketAddr::from((edge.sites[0].server, 9000));
    let traffic = std::thread::spawn(move || {
        let mut n: u64 = 0;
        let started = Instant::now();
        // 2,000 packets per second, bounded to 20 s.
        while flag.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(20) {
            sender.send_to(&n.to_be_bytes(), target).expect("send");
            n += 1;
            std::thread::sleep(Duration::from_micros(500));
        }
        n
    });
    std::thread::sleep(Duration::from_millis(500));
    d.restart().expect("restart");
    std::thread::sleep(Duration::from_millis(500));
    sending.store(false, Ordering::Relaxed);
    let sent = traffic.join().expect("sender");
    let seen = counting.join().expect("receiver");
    let s4 = status(&d);
    eprintln!("restart under traffic: {sent} sent, {} received", seen.len());
    assert!(sent > 1000, "too little traffic to show anything: {sent}");
    assert_eq!(seen.len() as u64, sent, "packets lost across the restart:\n{}", d.log());
    assert_eq!(s4["data_plane"]["opened"], "adopted");
    assert_eq!(
        s4["data_plane"]["program_id"], program,
        "the same program keeps running"
    );
    assert_eq!(s4["data_plane"]["consistent"], true);
    assert_eq!(customers(&s4), customers(&s3));
    let log = d.log();
    let after_restart = &log[log.rfind("adopted the running data plane").expect("adopted")..];
    let applied = after_restart
        .lines()
        .find(|l| l.contains("INFO applied "))
        .expect("the apply line after the restart");
    assert!(
        applied.contains(": 0 added, 0 changed, 0 removed in"),
        "adopting the same config writes nothing: {applied}"
    );
    assert_eq!(http::get_many(&edge.inet, edge.sites[1].server, 5), 5);

    // `moat down` is what stops forwarding.
    let out = d.down().expect("moat down");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!d.pin_dir.exists(), "pins removed");
    let link = edge
        .node
        .exec("ip", &["-d", "link", "show", "n-inet"])
        .expect("ip link");
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "still attached after moat down"
    );
    assert_eq!(
        http::get_many(&edge.inet, edge.sites[0].server, 2),
        0,
        "forwarding must stop"
    );

    stop.store(true, Ordering::Relaxed);
    assert!(server1.join().expect("server 1") >= 25);
    assert!(server2.join().expect("server 2") >= 10);
}

#[test]
fn validate_cli() {
    let dir = std::env::temp_dir().join(format!("moat-t-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = dir.join("good.yaml");
    std::fs::write(&good, Edge::config_yaml(&[(0, 42), (1, 7)])).expect("write");
    let out = std::process::Command::new(BIN)
        .args(["validate", "-c"])
        .arg(&good)
        .output()
        .expect("moat validate");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok: 2 customers, 2 prefixes, 2 tunnels, 2 routes\n"
    );
    let bad = dir.join("bad.yaml");
    let text = Edge::config_yaml(&[(0, 42), (1, 42)]).replace("remote: 192.0.2.26", "remote: 192.0.2.10")
        + "  - name: acme\n    prefixes: [203.0.113.0/26]\n";
    std::fs::write(&bad, text).expect("write");
    let out = std::process::Command::new(BIN)
        .args(["validate", "-c"])
        .arg(&bad)
        .output()
        .expect("moat validate");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains(": error: ")).collect();
    assert!(errors.len() >= 2, "every error at once: {stderr}");
    for e in &errors {
        let rest = e.strip_prefix(&format!("{}:", bad.display())).expect("FILE:");
        let mut parts = rest.splitn(3, ':');
        let line: usize = parts.next().and_then(|p| p.parse().ok()).expect("LINE");
        let col: usize = parts.next().and_then(|p| p.parse().ok()).expect("COL");
        assert!(line > 0 && col > 0, "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_flags_and_verification_repairs_maps_changed_behind_its_back() {
    use aya::maps::{lpm_trie::Key, Array, LpmTrie, Map, MapData};
    use moat_common::DestValue;

    let edge = Edge::new("drift").expect("topology");
    let config = Edge::config_yaml(&[(0, 42), (1, 7)])
        + "mitigation:\n  rules:\n    - name: memcached\n      expression: 'udp.srcport == 11211'\n      action: drop\n";
    let d = Daemon::start_with(Path::new(BIN), &edge.node, &config, &["--verify-interval", "5"]).expect("moat run");
    let clean = d.cli(&["status"]).expect("moat status");
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );

    // Something other than moat removes acme's destination entry.
    let data = MapData::from_pin(d.pin_dir.join("maps/DEST4")).expect("pinned DEST4");
    let mut dest: LpmTrie<MapData, [u8; 4], DestValue> = LpmTrie::try_from(Map::LpmTrie(data)).expect("LPM trie");
    dest.remove(&Key::new(25, [203, 0, 113, 0])).expect("remove");

    let out = d.cli(&["status"]).expect("moat status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "status must fail on a difference: {text}");
    assert!(
        text.contains("MAPS DIFFER") && text.contains("destination 203.0.113.0/25: missing from the maps"),
        "{text}"
    );
    let s = status(&d);
    assert_eq!(s["data_plane"]["consistent"], false);
    assert_eq!(
        customers(&s),
        BTreeSet::from(["globex".to_string()]),
        "status shows the maps, not the config"
    );

    // The periodic verification puts it back.
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&d)["data_plane"]["consistent"] != true {
        assert!(Instant::now() < deadline, "not repaired:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        customers(&status(&d)),
        BTreeSet::from(["acme".to_string(), "globex".to_string()])
    );
    assert!(
        d.log().contains("repairing") && d.log().contains("repaired: "),
        "{}",
        d.log()
    );
    assert!(dest.get(&Key::new(25, [203, 0, 113, 0]), 0).is_ok());

    // Packets look destinations up in the multibit table first: damage
    // there is flagged and repaired too. Clear globex's root entry
    // (203.0.x.x) in the live buffer.
    let mut active: Array<MapData, [u64; moat_common::active::WORDS as usize]> = Array::try_from(Map::Array(
        MapData::from_pin(d.pin_dir.join("maps/ACTIVE")).expect("pin"),
    ))
    .expect("array");
    let buf = active.get(&0, 0).expect("active words")[moat_common::active::DIR4 as usize];
    assert!(buf < 2, "a multibit table is live");
    let mut root: Array<MapData, u64> = Array::try_from(Map::Array(
        MapData::from_pin(d.pin_dir.join("maps/DIR4_ROOT")).expect("pin"),
    ))
    .expect("array");
    let index = buf as u32 * 65536 + (203 << 8);
    let entry = root.get(&index, 0).expect("root entry");
    assert_ne!(entry, 0);
    root.set(index, 0, 0).expect("tamper");
    let out = d.cli(&["status"]).expect("moat status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(
            "multibit destination table, 203.0.0.0/16: 256 differing ranges, e.g. 203.0.113.0/32 holds nothing"
        ),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&d)["data_plane"]["consistent"] != true {
        assert!(Instant::now() < deadline, "not repaired:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Rule sets switched off behind moat's back: flagged, then rewritten.
    let mut words = active.get(&0, 0).expect("active words");
    let rules = &mut words[moat_common::active::RULES as usize];
    assert!(*rules < 2, "the rule is in force");
    *rules = u64::from(moat_common::rules::CLS_NONE);
    active.set(0, words, 0).expect("tamper");
    let out = d.cli(&["status"]).expect("moat status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("rule sets: none in force"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&d)["data_plane"]["consistent"] != true {
        assert!(Instant::now() < deadline, "not repaired:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        active.get(&0, 0).expect("active words")[moat_common::active::RULES as usize] < 2,
        "the rule is back in force"
    );

    // A rule table changed behind moat's back with its digest left alone
    // (the mitigation set emptied): found by reading the live copy back,
    // flagged, then rewritten.
    let copy = active.get(&0, 0).expect("active words")[moat_common::active::RULES as usize] as u32;
    let mut sets: Array<MapData, moat_common::rules::ClsSet> = Array::try_from(Map::Array(
        MapData::from_pin(d.pin_dir.join("maps/CLS_SET")).expect("pin"),
    ))
    .expect("array");
    let at = copy * moat_common::rules::CLS_SETS;
    let good = sets.get(&at, 0).expect("mitigation set");
    assert!(good.nterms > 0, "{good:?}");
    sets.set(at, moat_common::rules::ClsSet { nterms: 0, ..good }, 0)
        .expect("tamper");
    let out = d.cli(&["status"]).expect("moat status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!("rule sets: CLS_SET[{at}] differs from this generation's")),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&d)["data_plane"]["consistent"] != true {
        assert!(Instant::now() < deadline, "not repaired:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let copy = active.get(&0, 0).expect("active words")[moat_common::active::RULES as usize] as u32;
    let now = sets
        .get(&(copy * moat_common::rules::CLS_SETS), 0)
        .expect("mitigation set");
    assert_eq!(now.nterms, good.nterms, "the mitigation set is whole again");
    let rules = &status(&d)["rules"];
    assert_eq!(rules[0]["rule"], "memcached", "{rules}");
    assert_eq!(rules[0]["set"], "mitigation", "{rules}");
}

#[test]
fn daemon_failure_paths() {
    let edge = Edge::new("fail").expect("topology");
    let config = Edge::config_yaml(&[(0, 42)]);
    let mut d = Daemon::start(Path::new(BIN), &edge.node, &config).expect("moat run");
    let _site = edge.start_site(0, Some(42)).expect("site endpoint");
    let stop = Arc::new(AtomicBool::new(false));
    let server = http::serve(&edge.sites[0].ns, edge.sites[0].server, stop.clone()).expect("server");
    assert_eq!(http::get_many(&edge.inet, edge.sites[0].server, 3), 3);
    let before = status(&d);

    // A second daemon on the same pin directory is refused; the first goes on.
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", edge.node.name()))
        .args([BIN, "run", "-c"])
        .arg(&d.config)
        .arg("--pin-dir")
        .arg(&d.pin_dir)
        .arg("--socket")
        .arg(d.socket.with_file_name("second.sock"))
        .output()
        .expect("second moat run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another moat daemon holds the pin directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A reload whose attach fails (no native XDP on loopback) is rolled
    // back: the generation in force stays, nothing of the new one remains.
    let bad =
        Edge::config_yaml(&[(0, 42), (1, 7)]).replace("    - name: n-site2\n", "    - name: n-site2\n    - name: lo\n");
    d.write_config(&bad).expect("write");
    let out = d.cli(&["reload"]).expect("moat reload");
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let after = status(&d);
    assert_eq!(after["generation"], 1);
    assert_eq!(after["last_reload"]["result"], "failed");
    assert_eq!(after["data_plane"]["consistent"], true, "{after:#}");
    assert_eq!(
        customers(&after),
        customers(&before),
        "globex must not stay half applied"
    );
    assert_eq!(after["interfaces"].as_array().map(Vec::len), Some(4));
    assert!(d.log().contains("restored: "), "{}", d.log());
    assert_eq!(http::get_many(&edge.inet, edge.sites[0].server, 3), 3);
    d.write_config(&config).expect("write");

    // An interface deleted and created again gets the program back.
    edge.node.ip(&["link", "del", "n-atk"]);
    moat_lab::netns::veth(&edge.attacker, "a0", &edge.node, "n-atk");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(&d);
        let atk = s["interfaces"]
            .as_array()
            .expect("interfaces")
            .iter()
            .find(|i| i["name"] == "n-atk")
            .cloned()
            .expect("n-atk");
        if atk["attached"] == true && s["data_plane"]["consistent"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n-atk not attached again: {atk}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Without a daemon, `moat down` removes the pins itself.
    d.stop().expect("SIGTERM");
    assert!(d.pin_dir.exists(), "SIGTERM leaves the data plane pinned");
    assert_eq!(
        http::get_many(&edge.inet, edge.sites[0].server, 3),
        3,
        "still forwarding"
    );
    let out = d.down().expect("moat down");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!d.pin_dir.exists());
    assert_eq!(
        http::get_many(&edge.inet, edge.sites[0].server, 1),
        0,
        "forwarding stops"
    );
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
}
