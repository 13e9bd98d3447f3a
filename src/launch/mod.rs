//! `disagg launch`: a whole PD topology from one YAML file (vLLM's pdjob schema, plus
//! optional fields: docs/LAUNCH.md), on this machine, one node's share of a multi-node
//! plan, or a Ray cluster.

pub(crate) mod local;
pub(crate) mod plan;
pub(crate) mod ranktable;
pub(crate) mod ray;
pub(crate) mod script;
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
    #[command(flatten)]
    pub(crate) script: script::ScriptArgs,
}

pub(crate) fn load(args: &LaunchArgs) -> anyhow::Result<plan::Plan> {
    if let Some(role) = args.script.role {
        return script::plan(&args.script, role, args.node_rank.unwrap_or(0), args.node_size.unwrap_or(1));
    }
    if args.node_rank.is_some() != args.node_size.is_some() {
        anyhow::bail!("--node-rank and --node-size go together");
    }
    let (name, text) = match args.file.as_ref().or(args.config_flag.as_ref()) {
        Some(p) => (p.display().to_string(), std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => ("<built-in demo>".to_string(), DEMO.to_string()),
    };
    let text = spec::config::expand_env(&name, &text)?;
    let file = spec::config::parse(&name, &text)?;
    let exe = std::env::current_exe().context("cannot find the disagg executable")?;
    let target = if args.ray.is_some() { plan::Target::Ray } else { plan::Target::Nodes };
    let plan = plan::build(&file, &name, &text, &exe, target)?;
    if let (Some(rank), Some(size)) = (args.node_rank, args.node_size) {
        if size != plan.nodes.len() {
            anyhow::bail!("--node-size {size}, but {name} lists {} node(s) under `nodes`", plan.nodes.len());
        }
        if rank >= size {
            anyhow::bail!("--node-rank {rank} is not below --node-size {size}");
        }
    }
    Ok(plan)
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
    let plan = load(&args)?;
    if args.dry_run {
        let node = if args.script.role.is_some() { None } else { args.node_rank };
        print!("{}", render(&plan, node));
        return Ok(());
    }
    match &args.ray {
        Some(addr) => ray::run(&plan, addr, &args.ray_python).await,
        // The launcher script's share is all of this node's plan.
        None if args.script.role.is_some() => local::run(&plan, None).await,
        None => local::run(&plan, args.node_rank).await,
    }
}
