//! `disagg launch FILE --sbatch`: the batch script of a plan: its nodes, one task per
//! node, its GPUs per node, a time limit, where Slurm writes the output, and the srun line
//! that runs this launcher on every node (which then takes its share from Slurm).

use std::path::Path;

use anyhow::Context;

use crate::launch::plan::Plan;
use crate::launch::spec::config::EngineKind;

/// What the script is made of, beside the plan.
pub(crate) struct BatchScript<'a> {
    pub(crate) plan: &'a Plan,
    /// The launch file, absolute.
    pub(crate) file: &'a Path,
    /// This launcher, absolute.
    pub(crate) exe: &'a Path,
    /// Where sbatch runs the script (the file's relative paths are from here).
    pub(crate) chdir: &'a Path,
    /// `--time` (Slurm's formats), or the partition's default.
    pub(crate) time: Option<&'a str>,
}

impl BatchScript<'_> {
    pub(crate) fn render(&self) -> String {
        let plan = self.plan;
        let nodes = plan.nodes.len();
        let uses_gpus = plan.engine == EngineKind::Vllm && plan.instances.iter().any(|i| !i.gpus.is_empty());
        let logs = plan.working_dir.join("logs");
        let stem = self.file.file_stem().map_or("plan".into(), |s| s.to_string_lossy().into_owned());
        let q = |p: &Path| shlex::try_quote(&p.display().to_string()).map(|c| c.into_owned()).unwrap_or_else(|_| p.display().to_string());
        let mut s = String::from("#!/bin/bash\n");
        s.push_str(&format!("# Written by `disagg launch {} --sbatch`: every node runs its share of the plan; the\n", self.file.display()));
        s.push_str("# router runs on the first. Submit with `sbatch THIS`; options given to sbatch override these.\n");
        s.push_str(&format!("#SBATCH --job-name=disagg-{stem}\n"));
        s.push_str(&format!("#SBATCH --nodes={nodes}\n#SBATCH --ntasks-per-node=1\n"));
        if uses_gpus {
            s.push_str(&format!("#SBATCH --gpus-per-node={}\n", plan.gpus_per_node));
        }
        if let Some(t) = self.time {
            s.push_str(&format!("#SBATCH --time={t}\n"));
        }
        s.push_str(&format!("#SBATCH --chdir={}\n", self.chdir.display()));
        s.push_str(&format!("#SBATCH --output={}\n", logs.join("slurm-%j.out").display()));
        s.push_str("set -euo pipefail\n");
        s.push_str(&format!("srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 {} launch {}\n", q(self.exe), q(self.file)));
        s
    }

    /// Slurm opens the output file before the script runs: its folder must exist.
    pub(crate) fn prepare(&self) -> anyhow::Result<()> {
        let logs = self.chdir.join(&self.plan.working_dir).join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))
    }
}
