//! `disagg launch`: a whole PD topology from one YAML file (vLLM's pdjob schema, plus
//! optional fields: docs/LAUNCH.md), on this machine, one node's share of a multi-node
//! plan, or a Ray cluster.

pub mod argv;
pub mod config;
pub mod connector;
pub mod local;
pub mod plan;
pub mod ray;
pub mod ranktable;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

const DEMO: &str = include_str!("demo.yaml");

#[derive(Args, Debug, Clone)]
pub struct LaunchArgs {
    /// The launch file: vLLM's pdjob YAML schema, plus disagg's optional fields. Without
    /// it, a built-in demo runs: two simulated prefills, one simulated decode, a router.
    pub config: Option<PathBuf>,
    /// Print the plan (per node and instance: command line, environment, ports, GPUs)
    /// and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Run only this node's share of a multi-node plan (0 = the node that also runs the
    /// router). Needs --node-size.
    #[arg(long, requires = "node_size")]
    pub node_rank: Option<usize>,
    /// Number of nodes of the plan (checked against the file's `nodes`).
    #[arg(long, requires = "node_rank")]
    pub node_size: Option<usize>,
    /// Run on an existing Ray cluster at ADDRESS (host:port of its GCS): a placement
    /// group per replica, instances where Ray places them, the router on the head node.
    #[arg(long, value_name = "ADDRESS", conflicts_with_all = ["node_rank", "node_size"])]
    pub ray: Option<String>,
    /// Python with the `ray` package, for --ray.
    #[arg(long, default_value = "python3", requires = "ray")]
    pub ray_python: String,
}

pub fn load(args: &LaunchArgs) -> anyhow::Result<plan::Plan> {
    let (name, text) = match &args.config {
        Some(p) => (p.display().to_string(), std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => ("<built-in demo>".to_string(), DEMO.to_string()),
    };
    let text = config::expand_env(&name, &text)?;
    let file = config::parse(&name, &text)?;
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

pub fn render(plan: &plan::Plan, node: Option<usize>) -> String {
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
            let gpus = if i.gpus.is_empty() { "no GPU".to_string() } else { format!("GPUs {}", i.gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",")) };
            let dp = i.dp.as_ref().map_or(String::new(), |d| format!(", {d}"));
            out.push_str(&format!("  {} {endpoint}, {gpus}, side channel {}{dp}\n", i.name, i.side_channel_port));
            out.push_str(&format!("    $ {}\n", plan::shell_line(&i.env, &i.argv, &exe)));
        }
        if n == 0 {
            out.push_str(&format!("  router {}\n", plan::url(&plan.router.host, plan.router.port)));
            out.push_str(&format!("    $ {}\n", plan::shell_line(&plan.router.env, &plan.router.argv, &exe)));
        }
    }
    for note in &plan.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}

pub async fn run(args: LaunchArgs) -> anyhow::Result<()> {
    let plan = load(&args)?;
    if args.dry_run {
        print!("{}", render(&plan, args.node_rank));
        return Ok(());
    }
    match &args.ray {
        Some(addr) => ray::run(&plan, addr, &args.ray_python).await,
        None => local::run(&plan, args.node_rank).await,
    }
}
