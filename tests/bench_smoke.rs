//! The bench binary end to end at a tiny size: it spawns the relay (or a redis-server and
//! a cluster of relays), runs a workload and reports zero loss in its JSON line. Not a
//! performance test: no figure is asserted.

use std::process::Command;

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_imrelay-bench"))
        .args(args)
        .output()
        .expect("run imrelay-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "imrelay-bench {args:?} failed:\n{stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(line).expect("valid JSON")
}

#[test]
fn pairs_with_floor_comparison_delivers_everything() {
    let report = run(&[
        "pairs",
        "--spawn",
        "--pairs",
        "4",
        "--messages",
        "500",
        "--window",
        "8",
        "--compare-floor",
        "--timeout",
        "60",
    ]);
    assert_eq!(report["mode"], "pairs");
    assert_eq!(report["delivered"], 4 * 2 * 500);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["reordered"], 0);
    assert_eq!(report["duplicated"], 0);
    assert_eq!(report["floor"]["delivered"], 4 * 2 * 500);
    assert!(report["ratio"].as_f64().unwrap() > 0.0);
    assert!(report["relay_rss_kib"].as_u64().unwrap() > 0);
}

#[test]
fn fanout_reaches_every_member() {
    let report = run(&[
        "fanout",
        "--spawn",
        "--rooms",
        "2",
        "--members",
        "20",
        "--messages",
        "100",
        "--timeout",
        "60",
    ]);
    assert_eq!(report["delivered"], 2 * 20 * 100);
    assert_eq!(report["lost"], 0);
}

#[test]
fn stored_mode_delivers_everything_through_a_durable_store_and_times_the_acks() {
    let report = run(&[
        "stored",
        "--spawn",
        "--pairs",
        "4",
        "--messages",
        "300",
        "--window",
        "16",
        "--timeout",
        "60",
    ]);
    assert_eq!(report["mode"], "stored");
    assert_eq!(report["store"], "tmp");
    assert_eq!(report["delivered"], 4 * 2 * 300);
    assert_eq!(report["acks"], 4 * 2 * 300);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicated"], 0);
    assert_eq!(report["reordered"], 0);
    assert!(report["ack_latency_us"]["p50"].as_f64().unwrap() > 0.0);
}

#[test]
fn pairs_across_a_spawned_cluster_of_two_nodes_delivers_everything() {
    // Debian's redis-server, as tests/e2e_cluster.rs uses (tests/cluster/setup.sh installs it).
    assert!(
        std::path::Path::new("/usr/bin/redis-server").exists(),
        "this test needs /usr/bin/redis-server (tests/cluster/setup.sh installs it)"
    );
    let report = run(&[
        "pairs",
        "--spawn",
        "--cluster",
        "2",
        "--pairs",
        "4",
        "--messages",
        "300",
        "--window",
        "8",
        "--timeout",
        "60",
    ]);
    assert_eq!(report["mode"], "pairs");
    assert_eq!(report["nodes"], 2);
    assert_eq!(report["delivered"], 4 * 2 * 300);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicated"], 0);
    assert_eq!(report["reordered"], 0);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["relay_cpu_s_per_node"].as_array().unwrap().len(), 2);
    assert!(report["redis_cpu_s"].as_f64().is_some());
}
