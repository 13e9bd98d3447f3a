//! `/inference/v1/generate` through `disagg route` on simulators (`--enable-scale-out`):
//! the shared case (tokens_out.rs), the prompt's KV moved over the legs, and kv_aware
//! keying the request by its own token ids.

use crate::support::*;
use crate::tokens_out::generate_equals_plain;

#[tokio::test]
async fn token_ids_through_pd_equal_a_plain_instance() {
    let p = Proc::sim(&["--role", "prefill", "--enable-scale-out"]).await;
    let d = Proc::sim(&["--role", "decode", "--enable-scale-out"]).await;
    let plain = Proc::sim(&["--enable-scale-out"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    generate_equals_plain(&r.url, &plain.url, "sim-model", "Token ids in, token ids out, through a prefill and a decode.").await;
    let dm = metrics(&d.url).await;
    assert_eq!(metric(&dm, "vllm:prompt_tokens_by_source_total", &[("source", "local_compute")]), 0.0);
    assert!(metric(&dm, "vllm:prompt_tokens_by_source_total", &[("source", "external_kv_transfer")]) > 0.0);
    assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_blocks_held", &[]), 0.0);
    assert_idle(&r.url).await;
}
