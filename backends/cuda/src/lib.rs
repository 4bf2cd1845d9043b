//! CUDA device memory for kvtier, through cudarc with the driver loaded at run time.
//!
//! The crate builds without a CUDA toolkit. At run time [`CudaDevice::open`] first checks
//! that the driver library can be loaded (cudarc panics otherwise) and returns
//! [`CudaError::NoDriver`] when it cannot, so a machine without a GPU gets an error, not
//! a crash.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, PinnedHostSlice};

/// What can go wrong with the device.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// `libcuda.so` cannot be loaded.
    #[error("no CUDA driver: libcuda.so cannot be loaded (install the NVIDIA driver, or run without a GPU tier)")]
    NoDriver,
    /// The device ordinal does not exist.
    #[error("no CUDA device {ordinal}: {count} device(s) present")]
    NoDevice {
        /// Ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// A copy outside a device allocation.
    #[error("device range {offset}+{len} outside allocation of {size} bytes")]
    OutOfRange {
        /// Start of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
        /// Size of the allocation.
        size: usize,
    },
}

fn driver(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(e.to_string())
}

/// Whether the CUDA driver library can be loaded on this machine.
pub fn is_driver_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the driver library and reports
    // whether that worked; it touches no other state.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// One CUDA device and a stream for copies.
#[derive(Clone)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({})", self.ordinal)
    }
}

impl CudaDevice {
    /// Opens device `ordinal`.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        if !is_driver_present() {
            return Err(CudaError::NoDriver);
        }
        let count = CudaContext::device_count().map_err(driver)?.max(0) as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            ctx,
            stream,
            ordinal,
        })
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name.
    pub fn name(&self) -> Result<String, CudaError> {
        self.ctx.name().map_err(driver)
    }

    /// Allocates `bytes` of page-locked (pinned) host memory, zeroed: the source or
    /// destination of host↔device copies at the link's full speed.
    pub fn alloc_pinned(&self, bytes: usize) -> Result<PinnedBuffer, CudaError> {
        // SAFETY: flags 0 (plain cached pinned memory, readable by the CPU at full speed);
        // the memory is zeroed below before anyone reads it.
        let mut slice =
            unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }.map_err(driver)?;
        slice.as_mut_slice().map_err(driver)?.fill(0);
        Ok(PinnedBuffer { slice })
    }

    /// Allocates `bytes` of device memory, zeroed.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceMemory, CudaError> {
        let slice = self.stream.alloc_zeros::<u8>(bytes).map_err(driver)?;
        self.stream.synchronize().map_err(driver)?;
        Ok(DeviceMemory {
            slice,
            stream: self.stream.clone(),
        })
    }
}

/// A device allocation. Copies are synchronous: they return when the bytes have arrived.
pub struct DeviceMemory {
    slice: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

impl DeviceMemory {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// Whether the allocation is empty.
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), CudaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(CudaError::OutOfRange {
                offset,
                len,
                size: self.len(),
            }),
        }
    }

    /// Copies `src` to device bytes `offset..offset + src.len()`.
    pub fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), CudaError> {
        self.check(offset, src.len())?;
        let mut dst = self.slice.slice_mut(offset..offset + src.len());
        self.stream.memcpy_htod(src, &mut dst).map_err(driver)?;
        self.stream.synchronize().map_err(driver)
    }

    /// Copies device bytes `offset..offset + dst.len()` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        self.check(offset, dst.len())?;
        let src = self.slice.slice(offset..offset + dst.len());
        self.stream.memcpy_dtoh(&src, dst).map_err(driver)?;
        self.stream.synchronize().map_err(driver)
    }
}

/// Page-locked host memory (see [`CudaDevice::alloc_pinned`]).
pub struct PinnedBuffer {
    slice: PinnedHostSlice<u8>,
}

impl PinnedBuffer {
    /// The bytes (waits for copies still using the buffer).
    pub fn as_slice(&self) -> Result<&[u8], CudaError> {
        self.slice.as_slice().map_err(driver)
    }

    /// The bytes, writable (waits for copies still using the buffer).
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8], CudaError> {
        self.slice.as_mut_slice().map_err(driver)
    }
}

impl DeviceMemory {
    /// Copies all of `src` (pinned) to device bytes `offset..`.
    pub fn write_pinned(&mut self, offset: usize, src: &PinnedBuffer) -> Result<(), CudaError> {
        let len = src.slice.len();
        self.check(offset, len)?;
        let mut dst = self.slice.slice_mut(offset..offset + len);
        self.stream
            .memcpy_htod(&src.slice, &mut dst)
            .map_err(driver)?;
        self.stream.synchronize().map_err(driver)
    }

    /// Copies device bytes `offset..offset + dst.len()` into `dst` (pinned).
    pub fn read_pinned(&self, offset: usize, dst: &mut PinnedBuffer) -> Result<(), CudaError> {
        let len = dst.slice.len();
        self.check(offset, len)?;
        let src = self.slice.slice(offset..offset + len);
        self.stream
            .memcpy_dtoh(&src, &mut dst.slice)
            .map_err(driver)?;
        self.stream.synchronize().map_err(driver)
    }

    /// Copies all of `src` (another allocation on the same device) to bytes `offset..`.
    pub fn copy_from(&mut self, offset: usize, src: &DeviceMemory) -> Result<(), CudaError> {
        let len = src.len();
        self.check(offset, len)?;
        let mut dst = self.slice.slice_mut(offset..offset + len);
        self.stream
            .memcpy_dtod(&src.slice, &mut dst)
            .map_err(driver)?;
        self.stream.synchronize().map_err(driver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_fails_cleanly_or_round_trips() {
        match CudaDevice::open(0) {
            Err(CudaError::NoDriver) => {
                assert!(!is_driver_present());
                eprintln!("skipped device round trip: no CUDA driver on this machine");
            }
            Err(CudaError::NoDevice { .. }) => {
                eprintln!("skipped device round trip: no CUDA device")
            }
            Err(e) => panic!("unexpected error opening device 0: {e}"),
            Ok(dev) => {
                let mut mem = dev.alloc(1 << 20).unwrap();
                let src: Vec<u8> = (0..4096).map(|i| (i * 31) as u8).collect();
                mem.write(12_345, &src).unwrap();
                let mut back = vec![0u8; 4096];
                mem.read(12_345, &mut back).unwrap();
                assert_eq!(back, src);
                assert!(matches!(
                    mem.write((1 << 20) - 10, &src),
                    Err(CudaError::OutOfRange { .. })
                ));
                // Pinned staging and device-to-device copies.
                let mut pinned = dev.alloc_pinned(4096).unwrap();
                pinned.as_mut_slice().unwrap().copy_from_slice(&src);
                let mut other = dev.alloc(8192).unwrap();
                other.write_pinned(100, &pinned).unwrap();
                let mut third = dev.alloc(1 << 20).unwrap();
                third.copy_from(0, &other).unwrap();
                let mut out = dev.alloc_pinned(4096).unwrap();
                third.read_pinned(100, &mut out).unwrap();
                assert_eq!(out.as_slice().unwrap(), &src[..]);
            }
        }
    }
}
