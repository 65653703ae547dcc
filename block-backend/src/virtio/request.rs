//! Execution of one virtio-blk request (one descriptor chain).
//!
//! The chain is treated as two byte streams, as the spec requires (no assumption on framing):
//! the device-readable part holds the 16-byte header followed by the OUT data or the
//! DISCARD/WRITE_ZEROES segments; the device-writable part holds the IN data (or the GET_ID
//! answer) followed by the one status byte. Everything the guest controls is validated here:
//! a malformed request gets `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`, never a panic.

use std::io::{Read, Write};
use std::ops::Deref;

use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::{GuestMemory, GuestMemoryRegion};

use super::config::{SECTOR_SHIFT, SECTOR_SIZE};
use super::BlockDevice;
use crate::image::{check_range, ImageError};

/// Size of the request header (type, reserved/ioprio, sector).
const HEADER_LEN: usize = 16;
/// Size of one DISCARD/WRITE_ZEROES segment.
const SEGMENT_LEN: usize = 16;
/// Largest chunk moved between guest memory and the image at once: bounds the scratch buffer
/// whatever the guest asks for.
pub const CHUNK: usize = 256 * 1024;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
const FLAG_UNMAP: u32 = 1;

/// Why a request failed (logged at debug level; the guest sees only the status byte).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The descriptor chain does not map to guest memory.
    #[error("bad descriptor chain: {0}")]
    Chain(#[from] virtio_queue::Error),
    /// Copying from or to guest memory failed.
    #[error("guest memory access: {0}")]
    GuestMemory(#[from] std::io::Error),
    /// The header is shorter than 16 bytes.
    #[error("request header too short ({0} bytes)")]
    ShortHeader(usize),
    /// No room for the status byte.
    #[error("no device-writable byte for the status")]
    NoStatus,
    /// Data length not a multiple of the sector size.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(usize),
    /// Sector number overflows.
    #[error("sector {0} out of range")]
    SectorOverflow(u64),
    /// A malformed DISCARD/WRITE_ZEROES payload.
    #[error("bad discard/write-zeroes payload: {0}")]
    Segments(&'static str),
    /// The image refused the operation.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// Outcome of a request: status byte and how it came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `VIRTIO_BLK_S_OK`.
    Ok,
    /// `VIRTIO_BLK_S_IOERR`.
    IoErr,
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp,
}

impl Status {
    fn byte(self) -> u8 {
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// Per-queue reusable state: the bounce buffer (no allocation per request once warm).
#[derive(Debug, Default)]
pub struct Scratch {
    buf: Vec<u8>,
}

impl Scratch {
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        &mut self.buf[..len]
    }
}

/// What happened to one chain: the used length to report and the status written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into device-writable buffers (data + status), for the used ring.
    pub used_len: u32,
    /// Status written, or `None` when the chain had no place for it.
    pub status: Option<Status>,
}

impl BlockDevice {
    /// Executes the request carried by `chain` and writes its status. Returns the used length.
    pub fn process_chain<'a, M, T, B>(
        &self,
        mem: &'a M,
        chain: DescriptorChain<T>,
        scratch: &mut Scratch,
    ) -> Completion
    where
        M: GuestMemory,
        <<M as GuestMemory>::R as GuestMemoryRegion>::B: WithBitmapSlice<'a, S = B>,
        B: BitmapSlice,
        T: Deref + Clone,
        T::Target: GuestMemory + Sized,
    {
        let mut writer: Writer<'a, B> = match Writer::new(mem, chain.clone()) {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!("dropping request: {e}");
                return Completion {
                    used_len: 0,
                    status: None,
                };
            }
        };
        let data_len = match writer.available_bytes().checked_sub(1) {
            Some(n) => n,
            None => {
                tracing::debug!("dropping request: {}", RequestError::NoStatus);
                return Completion {
                    used_len: 0,
                    status: None,
                };
            }
        };
        let mut status_w = match writer.split_at(data_len) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("dropping request: {e}");
                return Completion {
                    used_len: 0,
                    status: None,
                };
            }
        };
        let status = match Reader::new(mem, chain) {
            Ok(mut reader) => self.execute(&mut reader, &mut writer, data_len, scratch),
            Err(e) => Err(RequestError::Chain(e)),
        };
        let status = status.unwrap_or_else(|e| {
            tracing::debug!("request failed: {e}");
            Status::IoErr
        });
        let wrote_status = status_w.write_all(&[status.byte()]).is_ok();
        let used = writer.bytes_written() + usize::from(wrote_status);
        Completion {
            used_len: u32::try_from(used).unwrap_or(u32::MAX),
            status: wrote_status.then_some(status),
        }
    }

    fn execute<B: BitmapSlice>(
        &self,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
        in_len: usize,
        scratch: &mut Scratch,
    ) -> Result<Status, RequestError> {
        let mut header = [0u8; HEADER_LEN];
        let avail = reader.available_bytes();
        if avail < HEADER_LEN {
            return Err(RequestError::ShortHeader(avail));
        }
        reader.read_exact(&mut header)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        match kind {
            VIRTIO_BLK_T_IN => self.read(writer, sector, in_len, scratch),
            VIRTIO_BLK_T_OUT => self.write(reader, sector, scratch),
            VIRTIO_BLK_T_FLUSH => {
                self.image.flush()?;
                Ok(Status::Ok)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = in_len.min(self.id.len());
                writer.write_all(&self.id[..n])?;
                Ok(Status::Ok)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.params.read_only {
                    return Ok(Status::Unsupp);
                }
                self.discard_or_zero(reader, kind == VIRTIO_BLK_T_WRITE_ZEROES)
            }
            _ => Ok(Status::Unsupp),
        }
    }

    fn byte_range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        if len as u64 % SECTOR_SIZE != 0 {
            return Err(RequestError::Unaligned(len));
        }
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(RequestError::SectorOverflow(sector))?;
        check_range(offset, len as u64, self.image.size())?;
        Ok(offset)
    }

    fn read<B: BitmapSlice>(
        &self,
        writer: &mut Writer<'_, B>,
        sector: u64,
        len: usize,
        scratch: &mut Scratch,
    ) -> Result<Status, RequestError> {
        let mut offset = self.byte_range(sector, len)?;
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let buf = scratch.get(n);
            self.image.read_at(buf, offset)?;
            writer.write_all(buf)?;
            offset += n as u64;
            left -= n;
        }
        Ok(Status::Ok)
    }

    fn write<B: BitmapSlice>(
        &self,
        reader: &mut Reader<'_, B>,
        sector: u64,
        scratch: &mut Scratch,
    ) -> Result<Status, RequestError> {
        let len = reader.available_bytes();
        let mut offset = self.byte_range(sector, len)?;
        if self.params.read_only {
            return Err(ImageError::ReadOnly.into());
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let buf = scratch.get(n);
            reader.read_exact(buf)?;
            self.image.write_at(buf, offset)?;
            offset += n as u64;
            left -= n;
        }
        Ok(Status::Ok)
    }

    fn discard_or_zero<B: BitmapSlice>(
        &self,
        reader: &mut Reader<'_, B>,
        zeroes: bool,
    ) -> Result<Status, RequestError> {
        let len = reader.available_bytes();
        if len == 0 || len % SEGMENT_LEN != 0 {
            return Err(RequestError::Segments("length is not a multiple of 16"));
        }
        let count = len / SEGMENT_LEN;
        if count > self.params.max_discard_seg as usize {
            return Err(RequestError::Segments("too many segments"));
        }
        // Validate every segment before acting on any.
        let mut segs = [(0u64, 0u64, false); 64];
        let segs = segs
            .get_mut(..count)
            .ok_or(RequestError::Segments("too many segments"))?;
        for seg in segs.iter_mut() {
            let mut raw = [0u8; SEGMENT_LEN];
            reader.read_exact(&mut raw)?;
            let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or([0; 8]));
            let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or([0; 4]));
            if flags & !FLAG_UNMAP != 0 || (!zeroes && flags & FLAG_UNMAP != 0) {
                return Ok(Status::Unsupp);
            }
            if sectors > self.params.max_discard_sectors {
                return Err(RequestError::Segments(
                    "segment larger than the advertised limit",
                ));
            }
            let bytes = u64::from(sectors) << SECTOR_SHIFT;
            let offset = sector
                .checked_mul(SECTOR_SIZE)
                .ok_or(RequestError::SectorOverflow(sector))?;
            check_range(offset, bytes, self.image.size())?;
            *seg = (offset, bytes, flags & FLAG_UNMAP != 0);
        }
        for &(offset, bytes, unmap) in segs.iter() {
            if zeroes {
                self.image.write_zeroes(offset, bytes, unmap)?;
            } else {
                self.image.discard(offset, bytes)?;
            }
        }
        Ok(Status::Ok)
    }
}
