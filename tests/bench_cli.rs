//! `gptj bench` on `builtin:tiny` with a tiny range: the seed's table, CSV, JSON and plot, with
//! one row per length and one column per batch size.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gptj-bench-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn gptj_bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gptj"))
        .arg("bench")
        .args(["--model", "builtin:tiny"])
        .args(args)
        .env_remove("GPTJ_MODEL")
        .output()
        .expect("run gptj bench")
}

#[test]
fn bench_writes_table_csv_json_and_plot() {
    let dir = out_dir("run");
    let out = gptj_bench(&[
        "--batch-size",
        "2",
        "--min-length",
        "32",
        "--max-length",
        "64",
        "--length-step",
        "16",
        "--warmup-rounds",
        "1",
        "--out-dir",
        dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gptj bench failed:\n{stderr}");

    let csv = std::fs::read_to_string(dir.join("bench.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows[0], ["length", "batch_1", "batch_2"]);
    assert_eq!(rows.len(), 4, "{csv}");
    for (row, length) in rows[1..].iter().zip(["32", "48", "64"]) {
        assert_eq!(row[0], length);
        for cell in &row[1..] {
            let secs: f64 = cell.parse().unwrap();
            assert!(secs > 0.0 && secs.is_finite(), "{csv}");
        }
    }

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap()).unwrap();
    assert_eq!(json["batches"], serde_json::json!([1, 2]));
    assert_eq!(json["lengths"], serde_json::json!([32, 48, 64]));
    let points = json["points"].as_array().unwrap();
    assert_eq!(points.len(), 6);
    for p in points {
        assert!(p["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(p["preemptions"], 0);
    }

    let md = std::fs::read_to_string(dir.join("bench.md")).unwrap();
    assert!(
        md.contains("| Sequence length | batch 1 | batch 2 |"),
        "{md}"
    );
    assert_eq!(md.lines().filter(|l| l.starts_with("| 48 |")).count(), 2);
    // The table is printed too.
    assert!(String::from_utf8_lossy(&out.stdout).contains("| Sequence length |"));

    let svg = std::fs::read_to_string(dir.join("bench.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    assert_eq!(
        svg.matches("<polyline").count(),
        2,
        "one line per batch size"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn batch_size_zero_runs_nothing() {
    let dir = out_dir("zero");
    let out = gptj_bench(&["--batch-size", "0", "--out-dir", dir.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(!dir.exists());
}

#[test]
fn lengths_beyond_the_context_are_refused() {
    let dir = out_dir("long");
    let out = gptj_bench(&["--max-length", "4096", "--out-dir", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("context window"));
}
