//! What a topology is made of, as the user wrote it: the launch file (vLLM's pdjob
//! schema, config.rs), each KV connector's engine flags (connector.rs), and the command
//! lines' pieces (argv.rs). Reads nothing else of `launch`; the plan is made from it.

pub(crate) mod argv;
pub mod config;
pub mod connector;
