//! Borrowing caller memory: torch CPU tensors and buffer-protocol objects as byte regions
//! that Rust reads and writes in place while the GIL is released.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A contiguous span of caller memory, passed across `Python::detach` (plain integers, so
/// it is `Send`). Valid only while the [`HostMemory`] it came from is alive.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    pub(crate) addr: usize,
    pub(crate) len: usize,
}

impl Region {
    /// The region as bytes.
    ///
    /// # Safety
    /// The memory must stay alive and unwritten by others for the returned lifetime.
    pub(crate) unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees the region is live; `addr` is non-null for len > 0.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// The region as writable bytes.
    ///
    /// # Safety
    /// As [`Region::as_slice`], and nobody else may read or write it meanwhile.
    pub(crate) unsafe fn as_mut_slice<'a>(self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: the caller guarantees exclusive access to the live region.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

/// Caller memory borrowed for one call.
pub(crate) enum HostMemory {
    /// A torch tensor on the CPU (the caller's reference keeps it alive).
    Tensor(Region),
    /// A buffer-protocol object; released when dropped.
    Buffer(PyBuffer<u8>),
}

impl HostMemory {
    /// Borrows `obj`: a contiguous CPU torch tensor, or a C-contiguous buffer of bytes
    /// (`bytearray`, `memoryview(x).cast("B")`, a numpy `uint8` array, ...).
    pub(crate) fn borrow(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<HostMemory> {
        if obj.hasattr("data_ptr")? && obj.hasattr("is_contiguous")? {
            return tensor_region(obj).map(HostMemory::Tensor);
        }
        let buffer = PyBuffer::<u8>::get(obj).map_err(|e| {
            PyTypeError::new_err(format!(
                "expected a CPU torch tensor or a C-contiguous byte buffer \
                 (e.g. memoryview(x).cast('B')), got {}: {e}",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err("the buffer is not C-contiguous"));
        }
        if writable && buffer.readonly() {
            return Err(PyValueError::new_err(
                "the output buffer is read-only; pass a writable one",
            ));
        }
        Ok(HostMemory::Buffer(buffer))
    }

    /// The borrowed bytes.
    pub(crate) fn region(&self) -> Region {
        match self {
            HostMemory::Tensor(r) => *r,
            HostMemory::Buffer(b) => Region {
                addr: b.buf_ptr() as usize,
                len: b.len_bytes(),
            },
        }
    }
}

/// A contiguous torch CPU tensor as memory a transport may register: the reference it
/// holds keeps the tensor's storage alive (and in place) for as long as a registration or a
/// write in flight uses it.
pub(crate) struct TensorMemory {
    region: Region,
    _tensor: Py<PyAny>,
}

impl TensorMemory {
    /// The memory of `tensor` (see [`tensor_region`]).
    pub(crate) fn new(tensor: &Bound<'_, PyAny>) -> PyResult<TensorMemory> {
        Ok(TensorMemory {
            region: tensor_region(tensor)?,
            _tensor: tensor.clone().unbind(),
        })
    }
}

// SAFETY: a CPU tensor's storage stays allocated and does not move while a reference to
// the tensor is held (`_tensor`); the connector hands blocks to a transfer only after vLLM
// wrote them (saves follow the forward pass) and vLLM does not reuse them meanwhile.
unsafe impl kvtier::transport::RegionMemory for TensorMemory {
    fn as_ptr(&self) -> *mut u8 {
        self.region.addr as *mut u8
    }

    fn len(&self) -> usize {
        self.region.len
    }
}

/// The memory of a contiguous torch CPU tensor.
pub(crate) fn tensor_region(tensor: &Bound<'_, PyAny>) -> PyResult<Region> {
    let device: String = tensor.getattr("device")?.getattr("type")?.extract()?;
    if device != "cpu" {
        return Err(PyValueError::new_err(format!(
            "the tensor is on `{device}`; this build of kvtier moves KV in CPU memory"
        )));
    }
    if !tensor.call_method0("is_contiguous")?.extract::<bool>()? {
        return Err(PyValueError::new_err(
            "the tensor is not contiguous; pass tensor.contiguous()",
        ));
    }
    let addr: usize = tensor.call_method0("data_ptr")?.extract()?;
    let numel: usize = tensor.call_method0("numel")?.extract()?;
    let size: usize = tensor.call_method0("element_size")?.extract()?;
    Ok(Region {
        addr,
        len: numel * size,
    })
}
