//! Opening the data-plane transport a configuration asks for (`transfer_channel`).
//!
//! TCP is always built; UCX and NIXL are cargo features (`ucx`, `nixl`) because they link
//! native libraries. Asking for one that this build lacks is an error naming the feature.

pub use kvtier_transport::{
    Connection, HostBuffer, LocalIov, Notification, RegionId, RegionMemory, RegistrationHandle,
    RemoteAccess, RemoteIov, Transport, TransportConfig, TransportError, WriteGrants, WriterId,
};

use crate::config::TransferChannel;

/// Prepares the process for the native transports built in (today: keeps the NIXL wheel's
/// UCX from loading a module that crashes the process at exit, see
/// `kvtier_nixl::prepare_environment`). Call first thing in `main`, before threads start.
pub fn prepare_process() {
    #[cfg(feature = "nixl")]
    kvtier_nixl::prepare_environment();
}

/// Opens a transport of kind `channel`. Must be called within a tokio runtime.
pub fn open(
    channel: TransferChannel,
    config: TransportConfig,
) -> Result<Box<dyn Transport>, TransportError> {
    match channel {
        TransferChannel::Tcp => Ok(Box::new(kvtier_tcp::TcpTransport::bind(config)?)),
        #[cfg(feature = "ucx")]
        TransferChannel::Ucx => Ok(Box::new(kvtier_ucx::UcxTransport::new(config)?)),
        #[cfg(feature = "nixl")]
        TransferChannel::Nixl => Ok(Box::new(kvtier_nixl::NixlTransport::new(config)?)),
        #[allow(unreachable_patterns)]
        other => Err(TransportError::NotBuilt(format!(
            "`transfer_channel: {other}` needs kvtier built with `--features {other}`"
        ))),
    }
}
