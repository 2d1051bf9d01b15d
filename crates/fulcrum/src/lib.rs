//! fulcrum: a load balancer.
//!
//! The path of a request: a worker accepts a client connection ([`listener`]), hyper parses the
//! request, the listener's router picks a [`pool::Pool`] ([`http::route`]), the pool's selector orders
//! the candidate servers ([`balance`]), and [`http::proxy`] forwards the request over a pooled
//! connection ([`http::upstream`]) and streams the response back ([`http::body`]). [`runtime`] builds
//! all of it from a [`config::Config`] and stops it gracefully; [`control`] is the one owner of changes
//! while it runs (admin API, reload, [`discovery`], [`takeover`]); [`admin`] serves the API, metrics and
//! dashboard. See `docs/architecture.md`.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod cache;
pub mod clock;
pub mod config;
pub mod control;
pub mod demo;
pub mod discovery;
pub mod filter;
pub mod ha;
pub mod health;
pub mod http;
pub mod l4;
pub mod listener;
pub mod logging;
pub mod pipe;
pub mod pool;
pub mod runtime;
pub mod simulate;
pub mod sticky;
pub mod takeover;
pub mod tls;
