//! Integration tests: real processes over loopback HTTP. One binary, many modules.

mod capture;
mod handshake;
mod router_flow;
mod sim;
mod support;
