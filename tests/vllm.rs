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
        ("router output equals colocated (both APIs, stream or not, short and long)", |e| Box::pin(router_equals_colocated(e))),
        ("router: 8 concurrent requests", |e| Box::pin(router_concurrent(e))),
        ("router: KV moved, both prefills used", |e| Box::pin(router_moves_kv_over_both_prefills(e))),
        ("router: client leaving between legs strands no KV", |e| Box::pin(client_leaving_strands_nothing(e))),
        ("router: round trip vs direct", |e| Box::pin(round_trip(e))),
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
            |e| Box::pin(first_token_cases(e)),
        ),
        ("router: --pd-pool over two kv_both engines: A→B, B→A and A alone each equal plain vLLM, the KV moved to whichever decoded", |e| {
            Box::pin(elastic::every_layout_over_two_kv_both_engines(e))
        }),
        ("router: slo_aware's predicted TTFT against the observed, over the kv_both pool", |e| {
            Box::pin(elastic::predicted_ttft_against_observed(e))
        }),
        ("router: a prefill dies mid-run", |e| Box::pin(prefill_dies_mid_run(e))),
        ("vLLM closes a connection 5 s after its last answer, keeps an unused one (as the simulator)", |e| {
            Box::pin(keep_alive::idle_connections_close_after_their_last_answer(&e.plain.url))
        }),
        ("handshake: mismatched prompt fails (kills the decode)", |e| Box::pin(mismatch_kills_decode(e))),
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

async fn first_token_cases(e: &mut Env) {
    let engines = first_token::Engines {
        router: &e.router.url,
        plain: &e.plain.url,
        prefills: &[&e.p0.url, &e.p1.url],
        model: "tiny-llama",
        eos: 1,
        prompt: e.pair.prompt("first token", 2),
    };
    assert_eq!(first_token::first_token_ends_the_request(&engines).await, 12);
    assert_idle(&e.router.url).await;
}

async fn router_equals_colocated(e: &mut Env) {
    for path in ["/v1/completions", "/v1/chat/completions"] {
        for (tag, blocks) in [("short", 0usize), ("long", 3)] {
            let prompt = e.pair.prompt(&format!("router-{tag}-{path}"), blocks);
            let want = reference(e, path, &prompt, 16).await;
            for stream in [false, true] {
                let got = text(&format!("{}{path}", e.router.url), &body(path, &prompt, 16, stream)).await;
                assert_eq!(got, want, "{path} {tag} stream={stream}");
            }
        }
    }
    assert_idle(&e.router.url).await;
}

async fn router_concurrent(e: &mut Env) {
    let prompts: Vec<String> = (0..8).map(|i| e.pair.prompt(&format!("concurrent {i}"), i % 3)).collect();
    let mut want = Vec::new();
    for p in &prompts {
        want.push(reference(e, "/v1/completions", p, 16).await);
    }
    let url = format!("{}/v1/completions", e.router.url);
    let got = futures_util::future::join_all(prompts.iter().enumerate().map(|(i, p)| {
        let url = url.clone();
        let b = body("/v1/completions", p, 16, i % 2 == 0);
        async move { text(&url, &b).await }
    }))
    .await;
    assert_eq!(got, want);
    assert_idle(&e.router.url).await;
}

async fn router_moves_kv_over_both_prefills(e: &mut Env) {
    let source = |t: &str, s: &str| metric(t, "vllm:prompt_tokens_by_source_total", &[("source", s)]);
    let d0 = metrics(&e.d.url).await;
    let (p0, p1) = (metrics(&e.p0.url).await, metrics(&e.p1.url).await);
    let mut prompt_tokens = 0.0;
    for i in 0..4 {
        let (status, v) =
            post(&format!("{}/v1/completions", e.router.url), &body("/v1/completions", &e.pair.prompt(&format!("moved {i}"), 1), 8, false))
                .await;
        assert_eq!(status, 200, "{v}");
        prompt_tokens += v["usage"]["prompt_tokens"].as_f64().unwrap();
    }
    let d1 = metrics(&e.d.url).await;
    assert_eq!(
        source(&d1, "external_kv_transfer") - source(&d0, "external_kv_transfer"),
        prompt_tokens,
        "every prompt token came over NIXL"
    );
    assert_eq!(source(&d1, "local_compute"), source(&d0, "local_compute"), "none computed on the decode");
    let used = |before: &str, after: &str| metric(after, "vllm:prompt_tokens_total", &[]) - metric(before, "vllm:prompt_tokens_total", &[]);
    let (p0b, p1b) = (metrics(&e.p0.url).await, metrics(&e.p1.url).await);
    assert!(used(&p0, &p0b) > 0.0 && used(&p1, &p1b) > 0.0, "round robin used both prefills");
    assert_idle(&e.router.url).await;
}

/// Clients that leave at staggered moments, some of them between the legs: afterwards no
/// prefill holds KV (a stranded request would hold it for the 30 s lease).
async fn client_leaving_strands_nothing(e: &mut Env) {
    let abandoned = || async { metric(&metrics(&e.router.url).await, "disagg_router_abandoned_decode_legs_total", &[]) };
    let url = format!("{}/v1/completions", e.router.url);
    let mut delay_ms = 0u64;
    while abandoned().await < 1.0 {
        assert!(delay_ms < 3000, "no client left between the legs in any of the tries");
        for k in 0..10u64 {
            let b = body("/v1/completions", &e.pair.prompt(&format!("leave {delay_ms} {k}"), 2), 64, true);
            let url = url.clone();
            let req = tokio::spawn(async move {
                let resp = client().post(url).json(&b).send().await;
                if let Ok(mut r) = resp {
                    while let Ok(Some(_)) = r.chunk().await {}
                }
            });
            tokio::time::sleep(Duration::from_millis(delay_ms + k * 3)).await;
            req.abort();
        }
        delay_ms += 30;
    }
    println!("      {} decode legs kept for clients that left between the legs", abandoned().await);
    for p in [&e.p0, &e.p1] {
        let released =
            eventually(Duration::from_secs(10), || async { metric(&metrics(&p.url).await, "vllm:kv_cache_usage_perc", &[]) == 0.0 }).await;
        assert!(released, "{} still holds KV:\n{}", p.name, metrics(&p.url).await);
        assert!(!p.log_text().contains("Releasing expired KV blocks"), "{} released KV by lease expiry", p.name);
    }
    assert_eq!(get(&format!("{}/health", e.d.url)).await.0, 200, "the decode stays healthy");
    assert_idle(&e.router.url).await;
}

async fn round_trip(e: &mut Env) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (mut direct, mut routed) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let b = body("/v1/completions", &format!("round trip {i} with a few words"), 16, false);
        let t = Instant::now();
        e.pair.disaggregated("/v1/completions", &b, false).await;
        direct.push(t.elapsed().as_secs_f64() * 1000.0);
        let b = body("/v1/completions", &format!("round trip {i} routed with a few words"), 16, false);
        let t = Instant::now();
        assert_eq!(post(&format!("{}/v1/completions", e.router.url), &b).await.0, 200);
        routed.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (d, r) = (median(direct), median(routed));
    println!("      1P1D round trip, 16 output tokens, median of 20: direct {d:.1} ms, through disagg route {r:.1} ms ({:+.1} ms)", r - d);
}

async fn prefill_dies_mid_run(e: &mut Env) {
    let prompts: Vec<String> = (0..24).map(|i| e.pair.prompt(&format!("survive {i}"), i % 2)).collect();
    let mut want = Vec::new();
    for p in &prompts {
        want.push(reference(e, "/v1/completions", p, 12).await);
    }
    let url = format!("{}/v1/completions", e.router.url);
    let run = futures_util::future::join_all(prompts.iter().enumerate().map(|(i, p)| {
        let url = url.clone();
        let b = body("/v1/completions", p, 12, i % 2 == 1);
        async move {
            tokio::time::sleep(Duration::from_millis(50 * i as u64)).await;
            text(&url, &b).await
        }
    }));
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        e.p0.kill();
    };
    let (got, ()) = tokio::join!(run, killer);
    assert_eq!(got, want, "every request answered correctly by the surviving prefill");
    assert_idle(&e.router.url).await;
}

async fn mismatch_kills_decode(e: &mut Env) {
    e.pair.prefill = e.p1.url.clone();
    handshake::mismatched_prompt_fails(&e.pair).await;
    let dead = eventually(Duration::from_secs(30), || async {
        !matches!(client().get(format!("{}/health", e.d.url)).send().await, Ok(r) if r.status().is_success())
    })
    .await;
    assert!(dead, "real vLLM's decode engine dies on a KV mismatch (the sim's --die-on-kv-mismatch)");
}
