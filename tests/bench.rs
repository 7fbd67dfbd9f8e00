//! `dcam-stream bench` on a handful of images with the in-process cluster: the stage-cost table,
//! the main table with its limit columns, the paced-latency table and the final `e2e/limit = X.XX` line are printed and
//! parse. Timings are never asserted (the machine is shared).

mod common;

use std::process::Command;

use common::*;

fn cells(line: &str) -> Vec<String> {
    line.trim().trim_matches('|').split('|').map(|c| c.trim().to_string()).collect()
}

#[test]
fn bench_prints_stage_costs_limit_and_a_final_ratio_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_dcam-stream"))
        .args(["bench", "--dataset", &datasets().display().to_string(), "--images", "6", "--batches", "1,3", "--cost-images", "3"])
        .env("DCAM__MODEL__PATH", model_path())
        .current_dir(repo_root())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();

    // (c) stage costs: every stage once, inference at batch 1 and 3, each a positive number.
    for stage in ["| parse", "| decode + resize", "| inference, 1 intra-op thread, batch 1 |", "| inference, 1 intra-op thread, batch 3 |", "| heatmap"] {
        let line = lines.iter().find(|l| l.starts_with(stage)).unwrap_or_else(|| panic!("no {stage:?} row in\n{stdout}"));
        let ms: f64 = cells(line)[1].parse().unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(ms.is_finite() && ms >= 0.0, "{line}");
    }
    assert!(stdout.contains("limit at batch 1 = "), "{stdout}");

    // The main table: header with the limit and memory columns, one numeric row per batch size.
    let header = lines.iter().position(|l| l.starts_with("| batch | (a) raw img/s")).unwrap_or_else(|| panic!("no table in\n{stdout}"));
    let names = cells(lines[header]);
    for col in ["(b) e2e img/s", "(b)/(a)", "limit img/s", "(b)/limit", "peak RSS MB", "MB per in-flight"] {
        assert!(names.iter().any(|n| n == col), "no column {col:?} in {names:?}");
    }
    let rows: Vec<Vec<String>> = lines[header + 2..].iter().take_while(|l| l.starts_with('|')).map(|l| cells(l)).collect();
    assert_eq!(rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["1", "3"], "{stdout}");
    for r in &rows {
        assert_eq!(r.len(), names.len(), "{r:?}");
        for c in r {
            let v: f64 = c.parse().unwrap_or_else(|e| panic!("{c:?} in {r:?}: {e}"));
            assert!(v.is_finite() && v >= 0.0, "{r:?}");
        }
    }

    // (d) latency under load, paced at a fraction of the limit and of (b)'s best, with its bound:
    // one numeric row each, at a batch size run above.
    let paced = lines.iter().position(|l| l.starts_with("| paced at | batch | rate img/s |")).unwrap_or_else(|| panic!("no paced table in\n{stdout}"));
    let names = cells(lines[paced]);
    for col in ["scored img/s", "p50 ms", "p99 ms", "p50 in the topic ms", "p50 in the operator ms", "bound ms", "p99 / bound"] {
        assert!(names.iter().any(|n| n == col), "no column {col:?} in {names:?}");
    }
    let rows: Vec<Vec<String>> = lines[paced + 2..].iter().take_while(|l| l.starts_with('|')).map(|l| cells(l)).collect();
    assert_eq!(rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["limit", "(b) e2e"], "{stdout}");
    for row in &rows {
        assert_eq!(row.len(), names.len(), "{row:?}");
        assert!(["1", "3"].contains(&row[1].as_str()), "{row:?}");
        for c in &row[1..] {
            let v: f64 = c.parse().unwrap_or_else(|e| panic!("{c:?} in {row:?}: {e}"));
            assert!(v.is_finite() && v >= 0.0, "{row:?}");
        }
    }

    // Scripts read the last line.
    let last = lines.last().unwrap();
    let ratio: f64 = last.strip_prefix("e2e/limit = ").unwrap_or_else(|| panic!("last line is {last:?}")).parse().unwrap();
    assert!(ratio.is_finite() && ratio > 0.0, "{last}");
    assert_eq!(last.rsplit('.').next().map(str::len), Some(2), "two decimals: {last}");
}
