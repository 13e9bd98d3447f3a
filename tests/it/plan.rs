//! `disagg plan` on a small workload: every layout of 2 simulated engines measured per
//! phase, the table and plot written, the best layout named per phase and overall, and
//! the launch file it writes accepted by `disagg launch --dry-run`.

use crate::support::*;

#[test]
fn plan_measures_every_layout_and_writes_a_launch_file_the_launcher_takes() {
    let dir = temp_dir("plan");
    let file = dir.join("plan.yaml");
    let out = std::process::Command::new(BIN)
        .args(["plan", "--engines", "2", "--phases", "long-prompts:1500:8:20:30,long-answers:64:128:10:20", "--sim-speedup", "5"])
        .args(["--model", "tiny", "--out"])
        .arg(&dir)
        .arg("--write")
        .arg(&file)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // One row per layout, each phase measured (a goodput figure per phase), none failed.
    for layout in ["| 1P1D |", "| 2 colocated (kv_aware) |", "| 2 elastic (slo_aware) |"] {
        let row = stdout.lines().find(|l| l.starts_with(layout)).unwrap_or_else(|| panic!("{layout} in\n{stdout}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(cells[2].parse::<f64>().unwrap() > 0.0 && cells[3].parse::<f64>().unwrap() > 0.0, "{row}");
        assert!(cells[6].ends_with("/ 0"), "no request failed: {row}");
    }
    // The best per phase is the row with the most goodput in that phase's column.
    let rows: Vec<Vec<String>> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| layout"))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    for (k, phase) in ["long-prompts", "long-answers"].iter().enumerate() {
        let top = rows.iter().max_by(|a, b| a[2 + k].parse::<f64>().unwrap().total_cmp(&b[2 + k].parse::<f64>().unwrap())).unwrap();
        assert!(stdout.contains(&format!("Best for {phase}: {}", top[1])), "{phase}: {}\n{stdout}", top[1]);
    }
    assert!(stdout.contains("Best over the whole run: "), "{stdout}");
    assert!(std::fs::read_to_string(dir.join("plan.svg")).unwrap().contains("<svg"));
    let yaml = std::fs::read_to_string(&file).unwrap();
    assert!(yaml.starts_with("# disagg plan: "), "{yaml}");
    let (ok, plan, err) = crate::launch::run(&["launch", file.to_str().unwrap(), "--dry-run"]);
    assert!(ok, "{err}\n{yaml}");
    assert!(plan.contains("vllm serve tiny") && plan.contains(" route "), "{plan}");
}
