//! The HTTP side: accepting clients ([`server`]), routing ([`route`]), forwarding ([`proxy`]) over
//! pooled server connections ([`upstream`]), header rewriting ([`headers`]) and streamed bodies ([`body`]).

pub mod body;
pub mod headers;
pub mod proxy;
pub mod route;
pub mod server;
pub mod upstream;
