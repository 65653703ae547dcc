//! An in-memory image: for tests, benchmarks and scratch disks.

use std::sync::RwLock;

use super::{check_range, DiskImage, Format, ImageError, Result};

/// A disk held in process memory. Reports [`Format::Raw`].
#[derive(Debug)]
pub struct MemImage {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemImage {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize, read_only: bool) -> Self {
        MemImage {
            data: RwLock::new(vec![0; size]),
            read_only,
        }
    }

    /// A copy of the whole disk.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    fn writable(&self) -> Result<std::sync::RwLockWriteGuard<'_, Vec<u8>>> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        self.data
            .write()
            .map_err(|_| ImageError::Corrupt("poisoned lock".into()))
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>> {
        check_range(offset, len, self.size())?;
        Ok(offset as usize..(offset + len) as usize)
    }
}

impl DiskImage for MemImage {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = self.range(offset, buf.len() as u64)?;
        let d = self
            .data
            .read()
            .map_err(|_| ImageError::Corrupt("poisoned lock".into()))?;
        buf.copy_from_slice(&d[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let r = self.range(offset, buf.len() as u64)?;
        self.writable()?[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        let r = self.range(offset, len)?;
        self.writable()?[r].fill(0);
        Ok(())
    }
}
