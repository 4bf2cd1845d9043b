//! The kvtier store's server side: the [`master`] that keeps object placement
//! ([`placement`]) and leads through etcd, and the [`node`]s that contribute memory
//! segments. Engines reach them through the client side, [`super::client`]; both speak
//! [`super::rpc`].

pub mod master;
pub mod node;
pub mod placement;
