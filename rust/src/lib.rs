//! fastindex's core: walk, probe and store image datasets. Plain Rust modules; `py` is the only
//! one that knows Python.

pub mod batches;
pub mod coco;
pub mod db;
pub mod error;
pub mod header;
pub mod paths;
pub mod pools;
pub mod query;
pub mod remote;
pub mod scan;
pub mod sync;
pub mod throughput;
pub mod vectors;
pub mod walk;
pub mod watch;

mod leases;
mod open;
mod py;
mod py_remote;
mod py_watch;
mod schema;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SCHEMA_VERSION", db::SCHEMA_VERSION)?;
    m.add("STATUSES", db::STATUSES.to_vec())?;
    m.add("IMAGE_EXTENSIONS", walk::IMAGE_EXTENSIONS.to_vec())?;
    m.add_class::<py::Store>()?;
    m.add_class::<py::StopFlag>()?;
    m.add_class::<py_watch::Watcher>()?;
    m.add_function(wrap_pyfunction!(py::image_size, m)?)?;
    m.add_function(wrap_pyfunction!(py::probe_image, m)?)?;
    m.add_function(wrap_pyfunction!(py::probe_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(py_remote::read_object, m)?)?;
    m.add_function(wrap_pyfunction!(py_remote::read_objects, m)?)?;
    Ok(())
}
