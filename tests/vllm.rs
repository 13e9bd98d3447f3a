//! End to end against REAL vLLM (CPU build) with real NIXL KV transfer between processes.
//!
//!   cargo test --test vllm        (after scripts/vllm-env.sh; as root)
//!   DISAGG_VLLM_GROUPS=kv cargo test --test vllm   (one group: pd, kv, kv_aware, mooncake, tls or launch)
//!   DISAGG_VLLM_GROUPS=pd DISAGG_VLLM_CASES=priority cargo test --test vllm   (the PD cases naming a word)
//!
//! The binary re-runs itself inside a fresh loopback-only network namespace
//! (scripts/in-netns.sh): vLLM's UCX also listens on the machine's address, and tests may
//! only send traffic to loopback. Inside, it starts two prefill instances, a decode
//! instance and a plain instance (the colocated reference), then `disagg route`, and runs
//! the cases below in order, sharing the instances. The handshake cases are the very
//! functions the simulator's tests run (tests/it/handshake.rs).

#[path = "vllm/agent_fields.rs"]
mod agent_fields;
#[path = "vllm/apis.rs"]
mod apis;
#[path = "vllm/bench_compare.rs"]
mod bench_compare;
#[path = "vllm/elastic.rs"]
mod elastic;
#[path = "vllm/findings.rs"]
mod findings;
#[path = "it/first_token.rs"]
mod first_token;
#[allow(dead_code)]
#[path = "it/handshake.rs"]
mod handshake;
#[path = "it/keep_alive.rs"]
mod keep_alive;
#[path = "vllm/kv_aware.rs"]
mod kv_aware;
#[path = "it/kv_events.rs"]
mod kv_events;
#[path = "vllm/launch_layouts.rs"]
mod launch_layouts;
#[path = "it/messages.rs"]
mod messages;
#[path = "vllm/mooncake.rs"]
mod mooncake;
#[allow(dead_code)]
#[path = "it/mooncake_handshake.rs"]
mod mooncake_handshake;
#[allow(dead_code)]
#[path = "it/otlp.rs"]
mod otlp;
#[path = "it/passthrough.rs"]
mod passthrough;
#[path = "vllm/pd_router.rs"]
mod pd_router;
#[path = "vllm/prefix_cache.rs"]
mod prefix_cache;
#[path = "vllm/preflight.rs"]
mod preflight;
#[path = "vllm/priority.rs"]
mod priority;
#[path = "it/responses.rs"]
mod responses;
#[path = "vllm/slurm.rs"]
mod slurm;
#[path = "it/support.rs"]
mod support;
#[path = "vllm/timing.rs"]
mod timing;
#[path = "vllm/tls.rs"]
mod tls;
#[path = "it/tokens_out.rs"]
mod tokens_out;
#[path = "vllm/traces.rs"]
mod traces;

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use handshake::Pair;
use support::*;

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts");

fn main() -> ExitCode {
    if let Some(code) = support::reexec_in_netns() {
        return code;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run())
}

/// One real vLLM instance, its process group stopped when dropped.
struct Vllm {
    name: &'static str,
    child: Child,
    url: String,
    log: PathBuf,
}

impl Vllm {
    /// scripts/vllm-serve.sh ROLE PORT with its side channel, CPU and extra `vllm serve` arguments.
    fn spawn_with(name: &'static str, role: &str, port: u16, side: u16, cpu: u16, extra: &[&str]) -> Vllm {
        let (port, side, cpu) = (port.to_string(), side.to_string(), cpu.to_string());
        let mut args = vec![role, &port, "--side-channel-port", &side, "--cpu", &cpu];
        if !extra.is_empty() {
            args.push("--");
            args.extend(extra);
        }
        Vllm::spawn_script(name, &args)
    }

    /// scripts/vllm-serve.sh with these arguments (ROLE PORT first).
    fn spawn_script(name: &'static str, args: &[&str]) -> Vllm {
        let port = args[1];
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vllm-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(format!("{SCRIPTS}/vllm-serve.sh"))
            .args(args)
            // vLLM's own Responses store, so that a plain instance can chain by
            // previous_response_id as the router does; the router sends engines store: false.
            .env("VLLM_ENABLE_RESPONSES_API_STORE", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("start scripts/vllm-serve.sh");
        Vllm { name, child, url: format!("http://127.0.0.1:{port}"), log }
    }

    async fn wait_healthy(&mut self, within: Duration) {
        let end = Instant::now() + within;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}) before it was healthy:\n{}", self.name, self.tail());
            }
            if matches!(client.get(format!("{}/health", self.url)).send().await, Ok(r) if r.status().is_success()) {
                return;
            }
            assert!(Instant::now() < end, "{} not healthy after {within:?}:\n{}", self.name, self.tail());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the whole process group (the API server and its engine processes).
    fn kill(&mut self) {
        let pgid = self.child.id() as i32;
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Vllm {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
    }
}

struct Env {
    p0: Vllm,
    p1: Vllm,
    d: Vllm,
    plain: Vllm,
    /// The tiny model as an embedding model (`--runner pooling --convert embed`).
    pooling: Vllm,
    /// A decode that schedules by priority, one request at a time (priority.rs).
    prio: Vllm,
    router: Proc,
    pair: Pair,
    /// The OTLP receiver the PD instances (and a tracing router) send to.
    otlp: otlp::Receiver,
}

/// An empty folder of the suite's own under the target's tmp (what a case left before is
/// removed).
fn fresh_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn body(path: &str, prompt: &str, max_tokens: u32, stream: bool) -> Value {
    let mut b = if path.contains("chat") {
        json!({"model": "tiny-llama", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0})
    } else {
        json!({"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    };
    if stream {
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

async fn text(url: &str, body: &Value) -> String {
    if body["stream"] == true {
        let (status, events) = post_stream(url, body).await;
        assert_eq!(status, 200, "{url}: {events:?}");
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        assert!(events.iter().all(|e| !e.contains("\"error\"")), "{events:?}");
        stream_text(&events)
    } else {
        let (status, v) = post(url, body).await;
        assert_eq!(status, 200, "{url}: {v}");
        text_of(&v)
    }
}

async fn reference(e: &Env, path: &str, prompt: &str, max_tokens: u32) -> String {
    text(&format!("{}{path}", e.plain.url), &body(path, prompt, max_tokens, false)).await
}

type Case = for<'a> fn(&'a mut Env) -> Pin<Box<dyn Future<Output = ()> + 'a>>;

/// `DISAGG_VLLM_GROUPS=pd,kv,kv_aware,mooncake,tls,launch` (default: all) picks the groups to run, for
/// development; CI runs them all.
fn group_enabled(group: &str) -> bool {
    std::env::var("DISAGG_VLLM_GROUPS").map_or(true, |g| g.split(',').any(|x| x.trim() == group))
}

async fn run() -> ExitCode {
    let t0 = Instant::now();
    let mut failed: Vec<&'static str> = Vec::new();
    let mut tails = Vec::new();
    if group_enabled("pd") {
        tails = pd_cases(&mut failed).await;
    }
    if group_enabled("kv") {
        let what = "KV events, prefix cache, render endpoints and a fitted timing profile: vLLM and the simulator agree";
        whole_case(what, prefix_cache::run(), &mut failed).await;
    }
    if group_enabled("kv_aware") {
        whole_case(
            "kv_aware on 2 prefills + 1 decode: predictions equal vLLM's cached tokens, hit rate beats round_robin and cache_aware",
            kv_aware::run(),
            &mut failed,
        )
        .await;
    }
    if group_enabled("mooncake") {
        whole_case("Mooncake 1P1D through disagg route: output equals plain, KV moved", mooncake::run(), &mut failed).await;
    }
    if group_enabled("tls") {
        whole_case(
            "TLS: vLLM serving https with client certificates required, the router https on both sides: output equals plain",
            tls::run(),
            &mut failed,
        )
        .await;
    }
    if group_enabled("launch") {
        whole_case(
            "preflight: the guides' removed flags refused with file line and vLLM version; a start-up refusal stops a launch before it starts",
            preflight::preflight_with_vllm(),
            &mut failed,
        )
        .await;
        whole_case(
            "every example's and the launcher script's vllm serve commands pass vLLM's own parser and start-up checks",
            launch_layouts::checked_by_vllm(),
            &mut failed,
        )
        .await;
        whole_case(
            "DP 2 internal LB across two loopback nodes (one headless), launched and routed, every rank prefills, KV over NIXL",
            launch_layouts::layout_runs("internal", 2),
            &mut failed,
        )
        .await;
        whole_case(
            "DP 4 hybrid LB across two loopback nodes (an API server each), launched and routed, every rank prefills, KV over NIXL",
            launch_layouts::layout_runs("hybrid", 4),
            &mut failed,
        )
        .await;
        whole_case(
            "DP 2 external LB across two loopback nodes (tiny MoE): both ranks' API servers start and join, the router lists each",
            launch_layouts::layout_runs("external", 2),
            &mut failed,
        )
        .await;
        // Last: its cluster gives the namespace an interface besides loopback.
        whole_case(
            "disagg launch of examples/vllm-cpu-1p1d.yaml, under srun on a real Slurm cluster: each node's share on its address, output equals the engine alone",
            slurm::vllm_1p1d_under_srun(),
            &mut failed,
        )
        .await;
    }
    println!("real-vLLM suite: {:.1}s in all", t0.elapsed().as_secs_f64());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        for (name, tail) in tails {
            println!("---- {name} log tail ----\n{tail}");
        }
        println!("failed: {failed:?}");
        ExitCode::FAILURE
    }
}

/// Runs one case that starts its own instances; a panic is reported as its failure.
async fn whole_case(what: &'static str, case: impl Future<Output = ()>, failed: &mut Vec<&'static str>) {
    let t = Instant::now();
    match futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(case)).await {
        Ok(()) => println!("ok    {what} ({:.1}s)", t.elapsed().as_secs_f64()),
        Err(_) => {
            println!("FAIL  {what} ({:.1}s)", t.elapsed().as_secs_f64());
            failed.push(what);
        }
    }
}

/// The PD cases, sharing two prefill instances, a decode instance, a plain instance and
/// the router; returns the instances' log tails for a failure report.
async fn pd_cases(failed: &mut Vec<&'static str>) -> Vec<(String, String)> {
    let t0 = Instant::now();
    // --enable-scale-out: the token-in / token-out API (/inference/v1/generate) too; a tool
    // parser that needs no special tokens (pythonic), so that tools run (tests/it/messages.rs,
    // responses.rs).
    let scale_out = ["--enable-scale-out", "--enable-auto-tool-choice", "--tool-call-parser", "pythonic"];
    // The PD instances send their traces to the test's OTLP receiver (traces.rs).
    let otlp = otlp::Receiver::start();
    let traced: Vec<&str> = scale_out.iter().copied().chain(["--otlp-traces-endpoint", otlp.grpc.as_str()]).collect();
    let mut p0 = Vllm::spawn_with("prefill-0", "prefill", 8100, 5600, 0, &traced);
    // prefill-1 and decode-0 are `kv_both` (the GB200 guide's role: either leg per request),
    // so that they also serve as the router's --pd-pool (elastic.rs).
    let mut p1 = Vllm::spawn_with("prefill-1", "both", 8101, 5601, 1, &traced);
    let mut d = Vllm::spawn_with("decode-0", "both", 8200, 5700, 1, &traced);
    let mut plain = Vllm::spawn_with("plain", "plain", 8300, 5800, 0, &scale_out);
    let mut pooling = Vllm::spawn_with("pooling", "plain", 8400, 5900, 1, &["--runner", "pooling", "--convert", "embed"]);
    let mut prio =
        Vllm::spawn_with("decode-priority", "decode", 8201, 5701, 0, &["--scheduling-policy", "priority", "--max-num-seqs", "1"]);
    for v in [&mut p0, &mut p1, &mut d, &mut plain, &mut pooling, &mut prio] {
        v.wait_healthy(Duration::from_secs(600)).await;
    }
    println!(
        "real vLLM: 2 prefill + 2 decode (one by priority) + 1 plain + 1 pooling instance healthy in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let router = support::router(&["--policy", "round_robin", "--prefill", &p0.url, "--prefill", &p1.url, "--decode", &d.url]).await;
    let pair =
        Pair { prefill: p0.url.clone(), decode: d.url.clone(), colocated: plain.url.clone(), model: "tiny-llama".into(), block_size: 128 };
    let mut env = Env { p0, p1, d, plain, pooling, prio, router, pair, otlp };

    let cases: Vec<(&str, Case)> = vec![
        ("handshake: prefill returns params", |e| Box::pin(handshake::prefill_returns_params(&e.pair))),
        ("handshake: disaggregated equals colocated", |e| Box::pin(handshake::disaggregated_equals_colocated(&e.pair))),
        ("handshake: KV moves and is released", |e| Box::pin(handshake::kv_moves_and_is_released(&e.pair))),
        ("handshake: dead prefill fails the decode", |e| Box::pin(handshake::dead_prefill_fails_the_decode(&e.pair, 5999))),
        ("router output equals colocated (both APIs, stream or not, short and long)", |e| Box::pin(pd_router::router_equals_colocated(e))),
        ("router: 8 concurrent requests", |e| Box::pin(pd_router::router_concurrent(e))),
        ("router: KV moved, both prefills used", |e| Box::pin(pd_router::router_moves_kv_over_both_prefills(e))),
        ("router: client leaving between legs strands no KV", |e| Box::pin(pd_router::client_leaving_strands_nothing(e))),
        ("router: round trip vs direct", |e| Box::pin(pd_router::round_trip(e))),
        ("router: one trace per request holds the router's spans and both engines' vLLM spans, parented on the legs (OTLP)", |e| {
            Box::pin(traces::one_trace_across_router_and_engines(e))
        }),
        ("router: the Anthropic SDK's Messages calls through PD equal plain vLLM's (create, stream, turns, count_tokens, a named tool, an error)", |e| {
            Box::pin(apis::messages_through_pd(e))
        }),
        ("router: the OpenAI SDK's Responses calls through PD equal plain vLLM's (create, stream, structured output, a named function, a 3-turn previous_response_id chain over both prefills, retrieve, cancel, store false, errors)", |e| {
            Box::pin(apis::responses_through_pd(e))
        }),
        ("router: /inference/v1/generate (token ids in and out) through PD equals plain vLLM's, whole and streamed", |e| {
            Box::pin(apis::tokens_out_through_pd(e))
        }),
        ("router: the fields agents use survive both legs (logprobs, structured output, echo); prompt logprobs refused", |e| {
            Box::pin(apis::agent_fields(e))
        }),
        ("router: flow control's priority reaches vLLM (--scheduling-policy priority) on both legs: a high-priority request sent after a queue of low ones is served next", |e| {
            Box::pin(priority::served_by_priority(e))
        }),
        ("router: a pooling model's /v1/embeddings and /pooling pass through (equal the engine's)", |e| Box::pin(apis::pooling_passes_through(e))),
        ("router: vLLM's other APIs pass through (tokenize, detokenize, version equal the engine's; others 404)", |e| {
            Box::pin(passthrough::passes_through(&e.router.url, &e.p0.url, "tiny-llama"))
        }),
        ("disagg bench agrees with vllm bench serve (plain instance, and through the router)", |e| {
            Box::pin(bench_compare::bench_agrees_with_vllm(e))
        }),
        ("disagg bench replays a trace as vllm bench serve's timed_trace does (same counts)", |e| {
            Box::pin(bench_compare::timed_trace_agrees_with_vllm(e))
        }),
        ("router: decode-only field errors are vLLM's own, before any prefill", |e| Box::pin(findings::decode_only_errors_are_vllms(e))),
        ("router: a list of prompts is one pair per prompt (equals plain)", |e| Box::pin(findings::prompt_list_equals_plain(e))),
        ("router: n choices are one pair per choice (equals plain)", |e| Box::pin(findings::n_choices_equal_plain(e))),
        ("router: kv_transfer_params in vllm_xargs never reach vLLM", |e| Box::pin(findings::xargs_steering_is_dropped(e))),
        ("router: a non-streamed decode stops when its client leaves", |e| Box::pin(findings::abandoned_non_streamed_decode_stops(e))),
        (
            "router: a prefill whose first token ends the request (EOS, stop token, stop string) leaves no KV held (as on the simulator)",
            |e| Box::pin(pd_router::first_token_cases(e)),
        ),
        ("router: --pd-pool over two kv_both engines: A→B, B→A and A alone each equal plain vLLM, the KV moved to whichever decoded", |e| {
            Box::pin(elastic::every_layout_over_two_kv_both_engines(e))
        }),
        ("router: slo_aware's predicted TTFT against the observed, over the kv_both pool", |e| {
            Box::pin(elastic::predicted_ttft_against_observed(e))
        }),
        ("router: a prefill dies mid-run", |e| Box::pin(pd_router::prefill_dies_mid_run(e))),
        ("vLLM closes a connection 5 s after its last answer, keeps an unused one (as the simulator)", |e| {
            Box::pin(keep_alive::idle_connections_close_after_their_last_answer(&e.plain.url))
        }),
        ("handshake: mismatched prompt fails (kills the decode)", |e| Box::pin(pd_router::mismatch_kills_decode(e))),
    ];
    // DISAGG_VLLM_CASES=word,word: only the PD cases whose names hold one of the words.
    let only = std::env::var("DISAGG_VLLM_CASES").ok();
    for (name, case) in cases {
        if only.as_ref().is_some_and(|w| !w.split(',').any(|w| name.contains(w.trim()))) {
            continue;
        }
        let t = Instant::now();
        let fut = std::panic::AssertUnwindSafe(case(&mut env));
        match futures_util::FutureExt::catch_unwind(fut).await {
            Ok(()) => println!("ok    {name} ({:.1}s)", t.elapsed().as_secs_f64()),
            Err(_) => {
                println!("FAIL  {name} ({:.1}s)", t.elapsed().as_secs_f64());
                failed.push(name);
            }
        }
    }
    [&env.p0, &env.p1, &env.d].iter().map(|v| (v.name.to_string(), v.tail())).collect()
}
