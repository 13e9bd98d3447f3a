//! `disagg launch`: a whole PD topology from one YAML file (vLLM's pdjob schema, plus
//! optional fields: docs/LAUNCH.md), on this machine, one node's share of a multi-node
//! plan (by hand, or each node's task of a Slurm step), or a Ray cluster.

pub(crate) mod k8s;
pub(crate) mod local;
pub(crate) mod plan;
pub(crate) mod preflight;
pub(crate) mod ranktable;
pub(crate) mod ray;
pub(crate) mod script;
pub mod slurm;
pub mod spec;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

const DEMO: &str = include_str!("demo.yaml");

#[derive(Args, Debug, Clone)]
pub(crate) struct LaunchArgs {
    /// The launch file: vLLM's pdjob YAML schema, plus disagg's optional fields. Without
    /// it, a built-in demo runs: two simulated prefills, one simulated decode, a router.
    #[arg(conflicts_with = "role")]
    pub(crate) file: Option<PathBuf>,
    /// The launch file, as `vllm pdjob --config=FILE` takes it.
    #[arg(long = "config", value_name = "FILE", conflicts_with_all = ["file", "role"])]
    pub(crate) config_flag: Option<PathBuf>,
    /// Print the plan (per node and instance: command line, environment, ports, GPUs)
    /// and exit.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Run only this node's share of a multi-node plan (0 = the node that also runs the
    /// router). Needs --node-size. With --role: this node's rank among the role's nodes.
    #[arg(long)]
    pub(crate) node_rank: Option<usize>,
    /// Number of nodes of the plan (checked against the file's `nodes`). With --role: the
    /// role's nodes.
    #[arg(long)]
    pub(crate) node_size: Option<usize>,
    /// Run on an existing Ray cluster at ADDRESS (host:port of its GCS): a placement
    /// group per replica, instances where Ray places them, the router on the head node.
    #[arg(long, value_name = "ADDRESS", conflicts_with_all = ["node_rank", "node_size", "role"])]
    pub(crate) ray: Option<String>,
    /// Python with the `ray` package, for --ray.
    #[arg(long, default_value = "python3", requires = "ray")]
    pub(crate) ray_python: String,
    /// Print the Slurm batch script of the plan (its nodes, one task per node, GPUs per
    /// node, --time, the output's path, the srun line) and exit; creates the logs folder
    /// Slurm writes the output to.
    #[arg(long, conflicts_with_all = ["dry_run", "node_rank", "node_size", "ray", "role"])]
    pub(crate) sbatch: bool,
    /// The batch script's time limit, in Slurm's formats (`2:00:00`, `1-00:00:00`).
    #[arg(long, requires = "sbatch")]
    pub(crate) time: Option<String>,
    /// Check every `vllm serve` line of the plan with the installed vLLM's own parser and
    /// start-up checks (starting nothing), report per instance, and exit (1 if vLLM refuses
    /// any). Without it, the same check runs before a launch or a --sbatch script, where
    /// a vLLM is importable.
    #[arg(long, conflicts_with_all = ["dry_run", "sbatch", "ray", "no_check"])]
    pub(crate) check: bool,
    /// Start without checking the `vllm serve` lines with vLLM first.
    #[arg(long)]
    pub(crate) no_check: bool,
    /// Write the plan as Kubernetes manifests into DIR (Deployments or LeaderWorkerSets,
    /// Services, probes, GPU requests, the router; a kustomization) and exit.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["dry_run", "sbatch", "ray", "role", "node_rank", "node_size", "check"])]
    pub(crate) k8s: Option<PathBuf>,
    /// --k8s: the engines' image (`vllm` on its PATH).
    #[arg(long, default_value = "vllm/vllm-openai:latest", requires = "k8s")]
    pub(crate) image: String,
    /// --k8s: the router's image (`disagg` on its PATH; also the simulator's).
    #[arg(long, default_value = "disagg:latest", requires = "k8s")]
    pub(crate) router_image: String,
    /// --k8s: the namespace (the kustomization's).
    #[arg(long, requires = "k8s")]
    pub(crate) namespace: Option<String>,
    #[command(flatten)]
    pub(crate) script: script::ScriptArgs,
}

/// A plan, and which node's share this launcher runs (None: all of it).
pub(crate) struct Loaded {
    pub(crate) plan: plan::Plan,
    pub(crate) node: Option<usize>,
    /// Inside a Slurm allocation (not with --ray, --role or --sbatch).
    pub(crate) slurm: Option<slurm::Allocation>,
    /// The launch file's text (after `${env:...}`), for errors that name its lines.
    pub(crate) text: String,
}

pub(crate) fn load(args: &LaunchArgs) -> anyhow::Result<Loaded> {
    if let Some(role) = args.script.role {
        let plan = script::plan(&args.script, role, args.node_rank.unwrap_or(0), args.node_size.unwrap_or(1))?;
        // The launcher script's share is all of this node's plan.
        return Ok(Loaded { plan, node: None, slurm: None, text: String::new() });
    }
    if args.node_rank.is_some() != args.node_size.is_some() {
        anyhow::bail!("--node-rank and --node-size go together");
    }
    let slurm = match args.ray.is_none() && !args.sbatch && args.k8s.is_none() {
        true => slurm::Allocation::detect(&slurm::process_env())?,
        false => None,
    };
    if slurm.is_some() && args.node_rank.is_some() {
        anyhow::bail!("--node-rank/--node-size inside a Slurm allocation: Slurm says which node this is (SLURM_NODEID); drop them");
    }
    let (name, text) = match args.file.as_ref().or(args.config_flag.as_ref()) {
        Some(p) => (p.display().to_string(), std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => ("<built-in demo>".to_string(), DEMO.to_string()),
    };
    let text = spec::config::expand_env(&name, &text)?;
    let mut file = spec::config::parse(&name, &text)?;
    let slurm_rank = match &slurm {
        Some(alloc) => alloc.apply(&mut file, &name)?,
        None => None,
    };
    if (args.sbatch || args.k8s.is_some()) && file.nodes.is_empty() {
        // Slurm or Kubernetes will choose the nodes; the plan needs as many as its GPUs fill
        // (placeholders: a batch script needs their count, manifests name pods, not nodes).
        let nodes = match file.gpus_per_node {
            Some(per) if per > 0 => file.num_gpus.div_ceil(per).max(1),
            _ => 1,
        };
        file.nodes = (0..nodes).map(|i| spec::config::NodeFile::Address(format!("planned-node-{i}"))).collect();
    }
    let exe = std::env::current_exe().context("cannot find the disagg executable")?;
    let target = match (&args.ray, &args.k8s) {
        (Some(_), _) => plan::Target::Ray,
        (None, Some(_)) => plan::Target::Kubernetes,
        (None, None) => plan::Target::Nodes,
    };
    let mut plan = plan::build(&file, &name, &text, &exe, target)?;
    if let (Some(rank), Some(size)) = (args.node_rank, args.node_size) {
        if size != plan.nodes.len() {
            anyhow::bail!("--node-size {size}, but {name} lists {} node(s) under `nodes`", plan.nodes.len());
        }
        if rank >= size {
            anyhow::bail!("--node-rank {rank} is not below --node-size {size}");
        }
    }
    if let (Some(alloc), Some(rank)) = (&slurm, slurm_rank) {
        // This node's devices as Slurm numbered them (the plan counts from 0).
        for i in plan.instances.iter_mut().filter(|i| i.node == rank) {
            let mapped: Option<Vec<&str>> = i.gpus.iter().map(|g| alloc.device(*g)).collect();
            let Some(mapped) = mapped.filter(|m| !m.is_empty()) else { continue };
            for (_, value) in i.env.iter_mut().filter(|(k, _)| *k == file.gpu_env) {
                *value = mapped.join(",");
            }
        }
    }
    Ok(Loaded { plan, node: slurm_rank.or(args.node_rank), slurm, text })
}

pub(crate) fn render(plan: &plan::Plan, node: Option<usize>) -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut out = format!(
        "# disagg launch plan: {} (engine {:?}, {} node(s), {} GPUs per node, timeout {}s, logs in {}/logs)\n",
        plan.file,
        plan.engine,
        plan.nodes.len(),
        plan.gpus_per_node,
        plan.timeout.as_secs(),
        plan.working_dir.display()
    );
    for (n, host) in plan.nodes.iter().enumerate() {
        if node.is_some_and(|want| want != n) {
            continue;
        }
        out.push_str(&format!("node {n} ({host})\n"));
        for i in plan.instances.iter().filter(|i| i.node == n) {
            let endpoint = i.url().unwrap_or_else(|| "headless (no HTTP server)".into());
            let gpus = if i.gpus.is_empty() {
                "no GPU".to_string()
            } else {
                format!("GPUs {}", i.gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
            };
            let dp = i.dp.as_ref().map_or(String::new(), |d| format!(", {d}"));
            out.push_str(&format!("  {} {endpoint}, {gpus}, side channel {}{dp}\n", i.name, i.side_channel_port));
            out.push_str(&format!("    $ {}\n", plan::shell_line(&i.env, &i.argv, &exe)));
        }
        if let (0, Some(router)) = (n, &plan.router) {
            out.push_str(&format!("  router {}\n", plan::url(router.scheme, &router.host, router.port)));
            out.push_str(&format!("    $ {}\n", plan::shell_line(&router.env, &router.argv, &exe)));
        }
    }
    for note in &plan.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}

pub(crate) async fn run(args: LaunchArgs) -> anyhow::Result<()> {
    let Loaded { plan, node, slurm, text } = load(&args)?;
    let exe = std::env::current_exe()?;
    if args.check {
        return match preflight::check(&plan, None).await? {
            preflight::Outcome::NoVllm(why) => anyhow::bail!("cannot check {} against vLLM: {why}", plan.file),
            outcome => {
                print!("{}", preflight::report(&plan, &outcome, &text, &exe)?);
                Ok(())
            }
        };
    }
    if let Some(dir) = &args.k8s {
        before_start(&args, &plan, None, &text, &exe).await?;
        let images = k8s::Images { engine: &args.image, router: &args.router_image, namespace: args.namespace.as_deref() };
        let files = k8s::write(&plan, &images, dir)?;
        println!(
            "wrote {} manifest file(s) and kustomization.yaml to {} (kubectl apply -k {}):",
            files.len(),
            dir.display(),
            dir.display()
        );
        print!("{}", k8s::describe(&plan));
        return Ok(());
    }
    if args.sbatch {
        before_start(&args, &plan, None, &text, &exe).await?;
        let file = args.file.as_ref().or(args.config_flag.as_ref()).context("--sbatch needs the launch file")?;
        let cwd = std::env::current_dir()?;
        let script = slurm::sbatch::BatchScript {
            plan: &plan,
            file: &std::fs::canonicalize(file).with_context(|| format!("cannot find {}", file.display()))?,
            exe: &exe,
            chdir: &cwd,
            time: args.time.as_deref(),
        };
        script.prepare()?;
        print!("{}", script.render());
        return Ok(());
    }
    if args.dry_run {
        if let Some(alloc) = &slurm {
            println!("# {} (this node: {})", alloc.describe(), node.map_or("none: not in a step".to_string(), |n| n.to_string()));
        }
        print!("{}", render(&plan, node));
        return Ok(());
    }
    if let Some(addr) = &args.ray {
        return ray::run(&plan, addr, &args.ray_python).await;
    }
    if let (Some(alloc), None) = (&slurm, node) {
        anyhow::bail!(
            "inside Slurm job {} but not in a step: run every node's share with `srun --nodes={} --ntasks-per-node=1 disagg launch FILE` ({})",
            alloc.job(),
            plan.nodes.len(),
            alloc.describe()
        );
    }
    let result = async {
        before_start(&args, &plan, node, &text, &exe).await?;
        local::run(&plan, node).await
    }
    .await;
    if let (Err(e), Some(alloc)) = (&result, &slurm) {
        // One node's share failed (or was refused by vLLM): the step fails as a whole,
        // every node stops.
        eprintln!("disagg launch: node {} failed: {e:#}", node.unwrap_or(0));
        alloc.cancel_step();
    }
    result
}

/// The preflight before anything starts (node's lines; all with None): vLLM's refusals
/// stop the launch; no vLLM here, or a check that cannot run, is said and let pass.
async fn before_start(args: &LaunchArgs, plan: &plan::Plan, node: Option<usize>, text: &str, exe: &std::path::Path) -> anyhow::Result<()> {
    if args.no_check || plan.engine != spec::config::EngineKind::Vllm {
        return Ok(());
    }
    match preflight::check(plan, node).await {
        Ok(preflight::Outcome::NoVllm(why)) => eprintln!("disagg launch: the vllm serve lines were not checked: {why}"),
        Ok(outcome) => eprint!("{}", preflight::report(plan, &outcome, text, exe)?),
        Err(e) => eprintln!("disagg launch: the vllm serve lines were not checked: {e:#}"),
    }
    Ok(())
}
