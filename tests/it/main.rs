//! Integration tests: real processes over loopback HTTP. One binary, many modules.

mod bench;
mod boundary;
mod capture;
mod connectors;
mod discovery;
mod first_token;
mod guides;
mod handshake;
mod keep_alive;
mod kv_aware;
mod kv_events;
mod launch;
mod launch_local;
mod messages;
mod mooncake_handshake;
mod passthrough;
mod router_admin;
mod router_faults;
mod router_flow;
mod router_hardening;
mod router_messages;
mod router_passthrough;
mod router_policy;
mod sim;
mod support;
mod tls;
