//! The virtio-blk device, independent of any transport.
//!
//! A transport (the vhost-user adapter of `rqemu-blk`, a test, `rqemu-bench`) pops descriptor
//! chains from its virtqueues and hands each to [`BlockDevice::process_chain`], then puts the
//! chain on the used ring with the returned length and notifies the driver.

use std::sync::Arc;

use crate::image::DiskImage;

pub mod config;
mod request;

pub use config::BlkParams;
pub use request::{Completion, Parsed, Prepared, RawIo, RequestError, Scratch, Status, CHUNK};

/// A virtio-blk device over one disk image, shared by all its queues.
#[derive(Debug)]
pub struct BlockDevice {
    image: Arc<dyn DiskImage>,
    params: BlkParams,
    id: [u8; config::ID_BYTES],
    config: [u8; config::CONFIG_SPACE_SIZE],
}

/// Errors building a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The serial is longer than GET_ID can carry.
    #[error("serial {0:?} is longer than 20 bytes")]
    SerialTooLong(String),
    /// Bad queue parameters.
    #[error("invalid queue parameters: {0}")]
    Queues(&'static str),
}

impl BlockDevice {
    /// Builds a device over `image`. A read-only image forces `params.read_only`.
    pub fn new(image: Arc<dyn DiskImage>, mut params: BlkParams) -> Result<Self, DeviceError> {
        if params.serial.len() > config::ID_BYTES {
            return Err(DeviceError::SerialTooLong(
                String::from_utf8_lossy(&params.serial).into_owned(),
            ));
        }
        if params.num_queues == 0 {
            return Err(DeviceError::Queues("at least one queue is needed"));
        }
        if !params.max_queue_size.is_power_of_two() {
            return Err(DeviceError::Queues("queue size must be a power of two"));
        }
        params.max_discard_seg = params.max_discard_seg.clamp(1, 64);
        params.read_only |= image.read_only();
        let mut id = [0u8; config::ID_BYTES];
        id[..params.serial.len()].copy_from_slice(&params.serial);
        let config = config::config_space(&params, image.size());
        Ok(BlockDevice {
            image,
            params,
            id,
            config,
        })
    }

    /// The parameters in force.
    pub fn params(&self) -> &BlkParams {
        &self.params
    }

    /// Device feature bits.
    pub fn features(&self) -> u64 {
        config::device_features(&self.params)
    }

    /// Reads the configuration space.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config::read_config(&self.config, offset, size)
    }

    /// The image behind the device.
    pub fn image(&self) -> &Arc<dyn DiskImage> {
        &self.image
    }
}

#[cfg(test)]
mod tests;
