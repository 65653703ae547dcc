//! Execution of one virtio-blk request (one descriptor chain).
//!
//! The chain is treated as two byte streams, as the spec requires (no assumption on framing):
//! the device-readable part holds the 16-byte header followed by the OUT data or the
//! DISCARD/WRITE_ZEROES segments; the device-writable part holds the IN data (or the GET_ID
//! answer) followed by the one status byte. Every descriptor is turned into a bounds-checked
//! slice of guest memory first; data then moves between the image and those slices directly
//! (`preadv`/`pwritev` for raw images). Everything the guest controls is validated: a malformed
//! request gets `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`, never a panic.

use std::ops::Deref;

use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::WithBitmapSlice;
use vm_memory::{GuestMemory, GuestMemoryRegion};

use super::config::{SECTOR_SHIFT, SECTOR_SIZE};
use super::BlockDevice;
use crate::image::{check_range, GuestSlice, ImageError};

/// Size of the request header (type, reserved/ioprio, sector).
const HEADER_LEN: usize = 16;
/// Size of one DISCARD/WRITE_ZEROES segment.
const SEGMENT_LEN: usize = 16;
/// Largest chunk moved through the bounce buffer at once (formats without direct guest I/O).
pub const CHUNK: usize = 256 * 1024;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
const FLAG_UNMAP: u32 = 1;
/// Longest chain accepted (the queue size bounds real chains; indirect tables may be longer).
const MAX_DESCRIPTORS: usize = 4096;

/// Why a request failed (logged at debug level; the guest sees only the status byte).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A descriptor does not map to guest memory.
    #[error("descriptor outside guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// Slicing guest memory failed.
    #[error("guest buffer: {0}")]
    Slice(#[from] vm_memory::VolatileMemoryError),
    /// The chain is longer than we accept.
    #[error("descriptor chain longer than {MAX_DESCRIPTORS}")]
    ChainTooLong,
    /// The header is shorter than 16 bytes.
    #[error("request header too short ({0} bytes)")]
    ShortHeader(usize),
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

/// Per-queue reusable state: the bounce buffer for formats that need one.
#[derive(Debug, Default)]
pub struct Scratch {
    buf: Vec<u8>,
}

/// What happened to one chain: the used length to report and the status written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into device-writable buffers (data + status), for the used ring.
    pub used_len: u32,
    /// Status written, or `None` when the chain had no place for it.
    pub status: Option<Status>,
}

/// A byte stream over guest slices.
struct Stream<'a> {
    slices: Vec<GuestSlice<'a>>,
    len: usize,
}

impl<'a> Stream<'a> {
    fn new() -> Self {
        Stream {
            slices: Vec::new(),
            len: 0,
        }
    }

    fn push(&mut self, s: GuestSlice<'a>) {
        self.len += s.len();
        self.slices.push(s);
    }

    /// Splits off the first `n` bytes (`n <= len`).
    fn take(&mut self, n: usize) -> Result<Stream<'a>, RequestError> {
        let mut head = Stream::new();
        let mut need = n;
        let mut rest = Vec::with_capacity(self.slices.len());
        for s in self.slices.drain(..) {
            if need == 0 {
                rest.push(s);
            } else if s.len() <= need {
                need -= s.len();
                head.push(s);
            } else {
                head.push(s.subslice(0, need)?);
                rest.push(s.offset(need)?);
                need = 0;
            }
        }
        self.slices = rest;
        self.len -= head.len;
        Ok(head)
    }

    /// Copies the first `buf.len()` bytes out (the caller checked the length).
    fn read_into(&self, buf: &mut [u8]) {
        let mut done = 0;
        for s in &self.slices {
            if done == buf.len() {
                break;
            }
            done += s.copy_to(&mut buf[done..]);
        }
    }
}

/// A parsed chain whose request runs synchronously ([`BlockDevice::run_parsed`]).
pub struct Parsed<'a> {
    readable: Stream<'a>,
    data_out: Stream<'a>,
    status_slot: Stream<'a>,
    bad_readable: Option<RequestError>,
}

/// A chain after [`BlockDevice::prepare_chain`].
pub enum Prepared<'a> {
    /// Nowhere to put a status: complete with this (used length 0), nothing done.
    Dropped(Completion),
    /// Run it with [`BlockDevice::run_parsed`] (after earlier asynchronous I/O completed, to
    /// keep flushes and the like ordered after it).
    Sync(Parsed<'a>),
    /// A read or write moving bytes straight between guest memory and the image file at the
    /// same offset ([`crate::image::DiskImage::passthrough_fd`]): the caller submits it.
    Io(RawIo),
}

/// A validated read or write for an asynchronous engine: iovecs into guest memory, the file
/// offset, and where the status byte goes. The pointers stay valid as long as the guest memory
/// the chain was parsed against stays mapped: the engine keeps that mapping alive until
/// [`RawIo::complete`].
#[derive(Debug)]
pub struct RawIo {
    /// `true` for a write (guest to file).
    pub write: bool,
    /// File offset.
    pub offset: u64,
    /// Guest buffers (at stable addresses for the kernel while in flight).
    pub iov: Box<[libc::iovec]>,
    /// Total bytes of `iov`.
    pub len: usize,
    status: *mut u8,
}

// SAFETY: the raw pointers are into guest memory, which is shared with the guest anyway;
// `RawIo` only carries them to the thread that completes the request.
unsafe impl Send for RawIo {}

impl RawIo {
    /// Writes the status for the kernel's result `res` (bytes moved or `-errno`) and returns
    /// the used length. A short read is completed with zeroes (end of file); a short write is
    /// an I/O error.
    ///
    /// # Safety
    /// The guest memory the chain was parsed against must still be mapped.
    pub unsafe fn complete(&self, res: i32) -> u32 {
        let moved = usize::try_from(res).ok();
        let ok = match moved {
            Some(n) if n == self.len => true,
            Some(n) if !self.write => {
                let mut skip = n;
                for v in self.iov.iter() {
                    if skip >= v.iov_len {
                        skip -= v.iov_len;
                        continue;
                    }
                    // SAFETY: inside the guest buffer `v` (`skip < iov_len`), mapped per the
                    // caller's contract.
                    unsafe {
                        std::ptr::write_bytes(
                            v.iov_base.cast::<u8>().add(skip),
                            0,
                            v.iov_len - skip,
                        )
                    };
                    skip = 0;
                }
                true
            }
            _ => false,
        };
        if !ok {
            tracing::debug!(
                "{} at {} failed: result {res}",
                if self.write { "write" } else { "read" },
                self.offset
            );
        }
        let st = if ok { Status::Ok } else { Status::IoErr };
        // SAFETY: the status byte is a device-writable guest byte, mapped per the contract.
        unsafe { std::ptr::write_volatile(self.status, st.byte()) };
        let data = if ok && !self.write { self.len } else { 0 };
        u32::try_from(data + 1).unwrap_or(u32::MAX)
    }
}

impl BlockDevice {
    /// Executes the request carried by `chain` and writes its status. Returns the used length.
    pub fn process_chain<'a, M, T>(
        &self,
        mem: &'a M,
        chain: DescriptorChain<T>,
        scratch: &mut Scratch,
    ) -> Completion
    where
        M: GuestMemory,
        <<M as GuestMemory>::R as GuestMemoryRegion>::B: WithBitmapSlice<'a, S = ()>,
        T: Deref,
        T::Target: GuestMemory + Sized,
    {
        match self.prepare_chain(mem, chain, false) {
            Prepared::Dropped(c) => c,
            Prepared::Sync(p) => self.run_parsed(p, scratch),
            // Not produced without `passthrough`.
            Prepared::Io(_) => Completion {
                used_len: 0,
                status: None,
            },
        }
    }

    /// Parses `chain`; with `passthrough`, an aligned read or write on an image that allows it
    /// comes back as [`Prepared::Io`] for the caller to submit.
    pub fn prepare_chain<'a, M, T>(
        &self,
        mem: &'a M,
        chain: DescriptorChain<T>,
        passthrough: bool,
    ) -> Prepared<'a>
    where
        M: GuestMemory,
        <<M as GuestMemory>::R as GuestMemoryRegion>::B: WithBitmapSlice<'a, S = ()>,
        T: Deref,
        T::Target: GuestMemory + Sized,
    {
        let dropped = Prepared::Dropped(Completion {
            used_len: 0,
            status: None,
        });
        let mut readable = Stream::new();
        let mut writable = Stream::new();
        let mut bad_readable: Option<RequestError> = None;
        for (i, desc) in chain.enumerate() {
            if i >= MAX_DESCRIPTORS {
                bad_readable = Some(RequestError::ChainTooLong);
                break;
            }
            let slice = mem.get_slice(desc.addr(), desc.len() as usize);
            match (slice, desc.is_write_only()) {
                (Ok(s), true) => writable.push(s),
                (Ok(s), false) => readable.push(s),
                (Err(e), true) => {
                    // Nowhere safe to put a status: drop the request.
                    tracing::debug!("dropping request: writable descriptor: {e}");
                    return dropped;
                }
                (Err(e), false) => bad_readable = Some(e.into()),
            }
        }
        let Some(data_len) = writable.len.checked_sub(1) else {
            tracing::debug!("dropping request: no device-writable byte for the status");
            return dropped;
        };
        let (data_out, status_slot) = match writable.take(data_len) {
            Ok(d) => (d, writable),
            Err(e) => {
                tracing::debug!("dropping request: {e}");
                return dropped;
            }
        };
        let parsed = Parsed {
            readable,
            data_out,
            status_slot,
            bad_readable,
        };
        if passthrough {
            if let Some(io) = self.as_raw_io(&parsed) {
                return Prepared::Io(io);
            }
        }
        Prepared::Sync(parsed)
    }

    /// The passthrough form of a valid, aligned IN/OUT request, if it has one.
    fn as_raw_io(&self, p: &Parsed<'_>) -> Option<RawIo> {
        let (fd_align, status) = (
            self.image.passthrough_fd()?.1,
            p.status_slot.slices.iter().find(|s| !s.is_empty())?,
        );
        if p.bad_readable.is_some() || p.readable.len < HEADER_LEN {
            return None;
        }
        let mut header = [0u8; HEADER_LEN];
        let mut readable = Stream {
            slices: p.readable.slices.clone(),
            len: p.readable.len,
        };
        readable.take(HEADER_LEN).ok()?.read_into(&mut header);
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let (write, data) = match kind {
            VIRTIO_BLK_T_IN => (false, &p.data_out),
            VIRTIO_BLK_T_OUT if !self.params.read_only => (true, &readable),
            _ => return None,
        };
        let offset = self.byte_range(sector, data.len).ok()?;
        if data.len == 0 || (write && !self.image.direct_io_ok(offset, data.len as u64)) {
            return None;
        }
        let a = fd_align as u64;
        if offset % a != 0 || !crate::image::direct::guest_aligned(&data.slices, fd_align) {
            return None; // the synchronous path bounces it
        }
        let iov: Box<[libc::iovec]> = data
            .slices
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        Some(RawIo {
            write,
            offset,
            iov,
            len: data.len,
            status: status.ptr_guard_mut().as_ptr(),
        })
    }

    /// Runs a parsed request synchronously and writes its status.
    pub fn run_parsed(&self, p: Parsed<'_>, scratch: &mut Scratch) -> Completion {
        let Parsed {
            mut readable,
            mut data_out,
            status_slot,
            bad_readable,
        } = p;
        let result = match bad_readable {
            Some(e) => Err(e),
            None => self.execute(&mut readable, &mut data_out, scratch),
        };
        let (status, written) = match result {
            Ok((st, n)) => (st, n),
            Err(e) => {
                tracing::debug!("request failed: {e}");
                (Status::IoErr, 0)
            }
        };
        let wrote_status = status_slot
            .slices
            .iter()
            .find(|s| !s.is_empty())
            .map(|s| s.copy_from(&[status.byte()]));
        let used = written + usize::from(wrote_status.is_some());
        Completion {
            used_len: u32::try_from(used).unwrap_or(u32::MAX),
            status: wrote_status.map(|()| status),
        }
    }

    /// Runs the request; returns its status and the bytes written to the writable data part.
    fn execute(
        &self,
        readable: &mut Stream<'_>,
        data_out: &mut Stream<'_>,
        scratch: &mut Scratch,
    ) -> Result<(Status, usize), RequestError> {
        if readable.len < HEADER_LEN {
            return Err(RequestError::ShortHeader(readable.len));
        }
        let mut header = [0u8; HEADER_LEN];
        readable.take(HEADER_LEN)?.read_into(&mut header);
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        match kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.byte_range(sector, data_out.len)?;
                self.image
                    .read_to_guest(&data_out.slices, offset, &mut scratch.buf)?;
                Ok((Status::Ok, data_out.len))
            }
            VIRTIO_BLK_T_OUT => {
                let offset = self.byte_range(sector, readable.len)?;
                if self.params.read_only {
                    return Err(ImageError::ReadOnly.into());
                }
                self.image
                    .write_from_guest(&readable.slices, offset, &mut scratch.buf)?;
                Ok((Status::Ok, 0))
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.params.ignore_flush {
                    self.image.flush()?;
                }
                Ok((Status::Ok, 0))
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_out.len.min(self.id.len());
                let mut left = &self.id[..n];
                for s in &data_out.slices {
                    let k = s.len().min(left.len());
                    s.subslice(0, k)?.copy_from(&left[..k]);
                    left = &left[k..];
                }
                Ok((Status::Ok, n))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.params.read_only {
                    return Ok((Status::Unsupp, 0));
                }
                let st = self.discard_or_zero(readable, kind == VIRTIO_BLK_T_WRITE_ZEROES)?;
                Ok((st, 0))
            }
            _ => Ok((Status::Unsupp, 0)),
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

    fn discard_or_zero(
        &self,
        readable: &mut Stream<'_>,
        zeroes: bool,
    ) -> Result<Status, RequestError> {
        let len = readable.len;
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
            readable.take(SEGMENT_LEN)?.read_into(&mut raw);
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
