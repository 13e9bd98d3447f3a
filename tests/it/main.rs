//! Integration tests: real processes over loopback HTTP. One binary, many modules.

mod handshake;
mod sim;
mod support;
