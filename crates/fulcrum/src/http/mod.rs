//! The HTTP side: accepting clients ([`server`]), routing ([`route`]), forwarding ([`proxy`]) over
//! pooled server connections ([`upstream`], [`chunked`]), header rewriting ([`headers`]) and streamed bodies ([`body`]).

pub mod body;
pub mod chunked;
pub mod client;
pub mod filter;
pub mod h1;
pub mod headers;
pub mod proxy;
pub mod request_head;
pub mod route;
pub mod server;
pub mod trace;
pub mod upstream;
