//! The Python boundary of object-storage reads (`remote::read`): whole objects or ranges,
//! with the GIL released and Ctrl-C honoured while requests are in flight.

use std::sync::atomic::AtomicBool;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};

use crate::error::Error;
use crate::py::run_interruptibly;
use crate::remote::read;

/// The bytes of the object at `uri` (`s3://bucket/key`), from `start` to `end` (exclusive).
#[pyfunction]
#[pyo3(signature = (uri, start=None, end=None))]
pub fn read_object<'py>(
    py: Python<'py>,
    uri: String,
    start: Option<u64>,
    end: Option<u64>,
) -> PyResult<Bound<'py, PyBytes>> {
    let stop = AtomicBool::new(false);
    let got = run_interruptibly(py, &stop, None, || {
        read::read_object(&uri, start, end, &stop)?.ok_or(Error::Cancelled)
    })?;
    Ok(PyBytes::new(py, &got))
}

/// Every object of `uris`, in order: its bytes, or the reason it could not be read (str).
#[pyfunction]
#[pyo3(signature = (uris, max_in_flight=64))]
pub fn read_objects<'py>(
    py: Python<'py>,
    uris: Vec<String>,
    max_in_flight: usize,
) -> PyResult<Bound<'py, PyList>> {
    let stop = AtomicBool::new(false);
    let got = run_interruptibly(py, &stop, None, || {
        read::read_objects(&uris, max_in_flight, &stop).ok_or(Error::Cancelled)
    })?;
    let items: Vec<Bound<'py, PyAny>> = got
        .into_iter()
        .map(|r| match r {
            Ok(b) => PyBytes::new(py, &b).into_any(),
            Err(reason) => PyString::new(py, &reason).into_any(),
        })
        .collect();
    PyList::new(py, items)
}
