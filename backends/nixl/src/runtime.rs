//! Finding and loading the NIXL C library (`libnixl_capi.so`) at run time.
//!
//! `nixl-sys` is built with its stub API: on the first NIXL call it `dlopen`s the bare
//! name `libnixl_capi.so` and aborts the process if that fails. So before any NIXL call
//! this module loads the library itself, once per process, from
//!
//! 1. `KVTIER_NIXL_LIB`, the path of `libnixl_capi.so` or of the folder holding it (the
//!    `nixl-cu12` wheel puts it in `<site-packages>/.nixl_cu12.mesonpy.libs`); best
//!    absolute, as a relative one is taken from the current directory; else
//! 2. the dynamic loader's search path (`LD_LIBRARY_PATH`, the `ld.so` cache).
//!
//! The handle is never closed: the stub's later `dlopen` of the bare name then finds the
//! already loaded library by its soname, and its dependencies and plugins resolve through
//! the library's own run path. A missing library is a [`TransportError::RuntimeMissing`]
//! that says what to install, never an abort.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvtier_transport::{Result, TransportError};

/// The environment variable naming the library or its folder.
pub const LIB_ENV: &str = "KVTIER_NIXL_LIB";
/// The NIXL C API library.
pub const LIB_NAME: &str = "libnixl_capi.so";
/// How to get the library.
const INSTALL: &str = "pip install --no-deps nixl-cu12==1.5.1 and set \
                       KVTIER_NIXL_LIB=<site-packages>/.nixl_cu12.mesonpy.libs";

/// UCX's module filter (an allow list of glob patterns; `^` excludes).
const UCX_MODULES: &str = "UCX_MODULES";

/// Prepares the process environment for the NIXL runtime; call it as early as possible
/// (before other threads start: it may set an environment variable), and in any case
/// before the runtime loads, which calls it too.
///
/// The `nixl-cu12` wheel's UCX carries an EFA module linked against the wheel's own copy of
/// libibverbs *and* the system's `libefa` (so the system's libibverbs and libnl load too).
/// With rdma-core's providers installed, both copies end up in the process, and the
/// wheel's libnl-route crashes in its exit-time destructor: the process dies with SIGSEGV
/// after `main` returned. A module that mixes two libibverbs copies cannot work anyway, so
/// unless the user chose modules with `UCX_MODULES`, it is kept out (`UCX_MODULES=^efa`).
pub fn prepare_environment() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os(UCX_MODULES).is_none() {
            std::env::set_var(UCX_MODULES, "^efa");
            tracing::info!(
                "NIXL: set UCX_MODULES=^efa (the nixl-cu12 wheel's EFA module crashes the \
                 process at exit when rdma-core is installed); set UCX_MODULES to choose"
            );
        }
    });
}

/// The outcome of the one load attempt of this process (the error explains it).
static LOADED: OnceLock<Result<(), String>> = OnceLock::new();

/// The error for a library that could not be found or loaded; `detail` says what was
/// tried.
pub(crate) fn missing(detail: &str) -> TransportError {
    TransportError::RuntimeMissing {
        transport: "nixl",
        what: format!("{LIB_NAME} not found: {INSTALL} ({detail})"),
    }
}

/// Where to load the library from, in order, given the value of [`LIB_ENV`]: the file it
/// names (or `libnixl_capi.so` in the folder it names), else the bare name for the
/// loader's search path. An `env` that names neither is an error: the caller asked for
/// that library and no other.
pub(crate) fn candidates(env: Option<&OsStr>) -> Result<Vec<PathBuf>, String> {
    match env {
        Some(value) if !value.is_empty() => {
            let given = PathBuf::from(value);
            let file = if given.is_dir() {
                given.join(LIB_NAME)
            } else {
                given.clone()
            };
            if file.is_file() {
                Ok(vec![file])
            } else {
                let base = match std::env::current_dir() {
                    Ok(cwd) if given.is_relative() => format!(" (relative to {})", cwd.display()),
                    _ => String::new(),
                };
                Err(format!(
                    "{LIB_ENV}={}{base} holds no {LIB_NAME}",
                    given.display()
                ))
            }
        }
        _ => Ok(vec![PathBuf::from(LIB_NAME)]),
    }
}

/// `dlopen`s `path` for the rest of the process (a bare name goes through the loader's
/// search path). Loading a file that is not a usable library is an error, not a crash.
pub(crate) fn open(path: &Path) -> Result<(), String> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))?;
    // SAFETY: c_path is a valid C string. Loading runs the library's initialisers: this is
    // the NIXL runtime the crate is built for (its soname is checked by the stub's lookup).
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns null or a C string valid until the next dl* call on this
        // thread; it is copied at once.
        let reason = unsafe {
            let err = libc::dlerror();
            if err.is_null() {
                "unknown dlopen error".to_string()
            } else {
                CStr::from_ptr(err).to_string_lossy().into_owned()
            }
        };
        return Err(format!("dlopen {}: {reason}", path.display()));
    }
    // The handle is deliberately never closed: NIXL objects live until process exit.
    Ok(())
}

/// Loads the library once per process from the first of `candidates()` that loads; later
/// calls return the first outcome.
pub(crate) fn load(candidates: impl FnOnce() -> Result<Vec<PathBuf>, String>) -> Result<()> {
    let outcome = LOADED.get_or_init(|| {
        prepare_environment();
        let mut tried = Vec::new();
        for path in candidates()? {
            match open(&path) {
                Ok(()) => {
                    if nixl_sys::is_stub() {
                        return Err(format!(
                            "{} loaded, but nixl-sys cannot open {LIB_NAME} by name \
                             (was NIXL called before the kvtier transport loaded it?)",
                            path.display()
                        ));
                    }
                    tracing::debug!("nixl runtime loaded from {}", path.display());
                    return Ok(());
                }
                Err(e) => tried.push(e),
            }
        }
        Err(tried.join("; "))
    });
    outcome.clone().map_err(|detail| missing(&detail))
}

/// The candidates from the process environment ([`LIB_ENV`], then the search path).
pub(crate) fn from_env() -> Result<Vec<PathBuf>, String> {
    let env: Option<OsString> = std::env::var_os(LIB_ENV);
    candidates(env.as_deref())
}

/// Whether the NIXL runtime can be used in this process: loads it on first call (see the
/// module docs for where it is looked for). Every [`NixlTransport`](crate::NixlTransport)
/// calls this first; tests and benches call it to report a missing runtime.
pub fn runtime_available() -> Result<()> {
    load(from_env)
}
