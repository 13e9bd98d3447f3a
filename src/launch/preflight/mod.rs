//! Preflight: every `vllm serve` line of a plan through the installed vLLM's own parser and
//! start-up checks (check_serve.py, run by the Python the `vllm` program runs with), before
//! anything starts: `disagg launch FILE --check`, and by default before a launch or a
//! `--sbatch` script. A flag that vLLM no longer takes is reported with the instance, the
//! command line, the file's line and the vLLM version, before nodes are allocated.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::plan::{shell_line, Instance, Plan};
use super::spec::config::EngineKind;

const SCRIPT: &str = include_str!("check_serve.py");
/// Importing vLLM and building each line's engine configuration takes seconds; a check
/// that takes this long is stuck.
const CHECK_TIMEOUT: Duration = Duration::from_secs(300);

/// One line's verdict, as check_serve.py writes it.
#[derive(Debug, Deserialize)]
pub(crate) struct Verdict {
    pub(crate) ok: bool,
    /// parse, validate, checks, run; or how far it got: api-server, headless.
    pub(crate) stage: String,
    pub(crate) error: Option<String>,
    pub(crate) note: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ScriptOutput {
    vllm: String,
    results: Vec<Verdict>,
}

/// What the check found.
pub(crate) enum Outcome {
    /// The installed vLLM's version and a verdict per checked instance.
    Checked { vllm: String, lines: Vec<(String, Verdict)> },
    /// No vLLM to check with here (why).
    NoVllm(String),
}

/// The instances of `node` (all with None) whose commands are `vllm serve` lines.
fn serve_lines(plan: &Plan, node: Option<usize>) -> Vec<(&Instance, Vec<String>)> {
    plan.instances
        .iter()
        .filter(|i| node.is_none_or(|n| i.node == n))
        .filter_map(|i| {
            let at = i.argv.iter().position(|w| w == "serve")?;
            Some((i, i.argv[at + 1..].to_vec()))
        })
        .collect()
}

/// The Python a `vllm` program runs with: its `#!` line (pip's `/bin/sh` wrapper for long
/// paths included), or the program itself when it is a Python.
fn python_of(program: &str) -> Option<PathBuf> {
    let path = if program.contains('/') {
        PathBuf::from(program)
    } else {
        std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(program)).find(|p| p.is_file())?
    };
    let name = path.file_name()?.to_string_lossy().into_owned();
    if name.starts_with("python") {
        return Some(path);
    }
    let mut head = vec![0u8; 512];
    let n = std::io::Read::read(&mut std::fs::File::open(&path).ok()?, &mut head).ok()?;
    let text = String::from_utf8_lossy(&head[..n]).into_owned();
    let mut lines = text.lines();
    let shebang = lines.next()?.strip_prefix("#!")?.trim().to_string();
    if shebang.contains("python") {
        let mut words = shebang.split_whitespace();
        let first = words.next()?;
        return match first.ends_with("/env") {
            true => python_of(words.next()?),
            false => Some(PathBuf::from(first)),
        };
    }
    // pip: #!/bin/sh, then '''exec' /very/long/path/python "$0" "$@"
    let exec = lines.next()?.strip_prefix("'''exec' ")?;
    exec.split_whitespace().next().map(PathBuf::from)
}

/// Runs the check over `node`'s `vllm serve` lines (all with None).
pub(crate) async fn check(plan: &Plan, node: Option<usize>) -> anyhow::Result<Outcome> {
    let lines = serve_lines(plan, node);
    if plan.engine != EngineKind::Vllm || lines.is_empty() {
        return Ok(Outcome::Checked { vllm: String::new(), lines: Vec::new() });
    }
    let program = &lines[0].0.argv[0];
    let Some(python) = python_of(program) else {
        return Ok(Outcome::NoVllm(format!("cannot tell which Python `{program}` runs with")));
    };
    let result = std::env::temp_dir().join(format!("disagg-check-{}-{}.json", std::process::id(), rand::random::<u32>()));
    let input: Vec<serde_json::Value> = lines
        .iter()
        .map(|(i, argv)| serde_json::json!({"argv": argv, "env": i.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()}))
        .collect();
    let mut child = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&result)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", python.display()))?;
    let mut stdin = child.stdin.take().context("the check's stdin")?;
    tokio::io::AsyncWriteExt::write_all(&mut stdin, serde_json::to_string(&input)?.as_bytes()).await?;
    drop(stdin);
    let out = match tokio::time::timeout(CHECK_TIMEOUT, child.wait_with_output()).await {
        Ok(out) => out?,
        Err(_) => bail!("the vLLM check ({}) took over {}s", python.display(), CHECK_TIMEOUT.as_secs()),
    };
    let text = std::fs::read_to_string(&result);
    let _ = std::fs::remove_file(&result);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || text.is_err() {
        if stderr.contains("No module named 'vllm") {
            return Ok(Outcome::NoVllm(format!("{} cannot import vllm", python.display())));
        }
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("the vLLM check ({}) failed ({}):\n{}", python.display(), out.status, tail.join("\n"));
    }
    let parsed: ScriptOutput = serde_json::from_str(&text?).context("the vLLM check's result")?;
    if parsed.results.len() != lines.len() {
        bail!("the vLLM check answered {} verdicts for {} lines", parsed.results.len(), lines.len());
    }
    Ok(Outcome::Checked { vllm: parsed.vllm, lines: lines.iter().map(|(i, _)| i.name.clone()).zip(parsed.results).collect() })
}

/// Where in the launch file a flag named in vLLM's error is written: `FILE:LINE`.
fn file_line(file: &str, text: &str, error: &str) -> Option<String> {
    error.split(|c: char| c.is_whitespace() || c == ',' || c == '\'' || c == '"').filter_map(|w| w.strip_prefix("--")).find_map(|flag| {
        let key = flag.split('=').next()?.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()).replace('-', "_");
        let dashed = format!("--{}", key.replace('_', "-"));
        let n = text.lines().position(|l| {
            let t = l.trim_start();
            t.starts_with(&format!("{key}:")) || t.contains(&dashed) || t.contains(&format!("--{key}"))
        })?;
        Some(format!("{file}:{} ({key})", n + 1))
    })
}

/// The report: one line per instance; Err naming every line vLLM refuses.
pub(crate) fn report(plan: &Plan, outcome: &Outcome, file_text: &str, exe: &Path) -> anyhow::Result<String> {
    let Outcome::Checked { vllm, lines } = outcome else { return Ok(String::new()) };
    let mut out = String::new();
    let mut refused = Vec::new();
    for (name, v) in lines {
        let note = v.note.as_ref().map_or(String::new(), |n| format!(" ({n})"));
        if v.ok {
            out.push_str(&format!("ok    {name}: vLLM {vllm} takes it ({}){note}\n", v.stage));
            continue;
        }
        let i = plan.instances.iter().find(|i| &i.name == name).expect("a checked instance is the plan's");
        let error = v.error.as_deref().unwrap_or("refused");
        let at = file_line(&plan.file, file_text, error).map_or(String::new(), |l| format!("\n    at {l}"));
        let line = format!(
            "FAIL  {name} (node {}): vLLM {vllm} refuses its `vllm serve` line ({}): {error}{at}\n    $ {}\n",
            i.node,
            v.stage,
            shell_line(&i.env, &i.argv, exe)
        );
        out.push_str(&line);
        refused.push(line);
    }
    if !refused.is_empty() {
        bail!(
            "{out}{} of {} `vllm serve` line(s) of {} refused by vLLM {vllm}; nothing was started",
            refused.len(),
            lines.len(),
            plan.file
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_python_of_a_vllm_program() {
        let dir = std::env::temp_dir().join(format!("disagg-python-of-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("vllm");
        std::fs::write(&plain, "#!/opt/venv/bin/python3\nimport sys\n").unwrap();
        assert_eq!(python_of(plain.to_str().unwrap()), Some(PathBuf::from("/opt/venv/bin/python3")));
        let wrapped = dir.join("vllm-long");
        std::fs::write(&wrapped, "#!/bin/sh\n'''exec' /very/long/venv/bin/python \"$0\" \"$@\"\n' '''\n").unwrap();
        assert_eq!(python_of(wrapped.to_str().unwrap()), Some(PathBuf::from("/very/long/venv/bin/python")));
        let script = dir.join("serve.sh");
        std::fs::write(&script, "#!/bin/bash\nexec vllm serve \"$@\"\n").unwrap();
        assert_eq!(python_of(script.to_str().unwrap()), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_refused_flag_is_found_in_the_file() {
        let text = "prefill:\n  params:\n    swap_space: 16\n";
        let err = "vllm serve: error: unrecognized arguments: --swap-space 16";
        assert_eq!(file_line("g.yaml", text, err).as_deref(), Some("g.yaml:3 (swap_space)"));
        assert_eq!(file_line("g.yaml", text, "no flag here"), None);
        let text = "decode:\n  params:\n    kv_transfer_config: '{}'\n";
        let err = "argument --kv-transfer-config: 1 validation error for KVTransferConfig";
        assert_eq!(file_line("a.yaml", text, err).as_deref(), Some("a.yaml:3 (kv_transfer_config)"));
    }
}
