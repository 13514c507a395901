//! Shared helpers of the integration tests: liblwi.so loaded with libloading exactly as a host
//! loads it, and the `lwi` command run as a script runs it.

use libloading::Library;
use std::ffi::{CStr, CString, c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace's `target/release`, where `make build` puts liblwi.so and lwi.
pub fn release_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release")
}

pub fn plugin_path() -> PathBuf {
    std::env::var_os("LWI_PLUGIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| release_dir().join("liblwi.so"))
}

/// Runs the `lwi` command with `args`.
pub fn lwi_cli(args: &[&str]) -> Output {
    let exe = std::env::var_os("LWI_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|| release_dir().join("lwi"));
    Command::new(&exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (run `make build`)", exe.display()))
}

/// A failed call: the status name and the message from `lwi_last_error`.
#[derive(Debug)]
pub struct Failure {
    pub status: i32,
    pub message: String,
}

pub const FORMAT: i32 = 3;
pub const UNSUPPORTED: i32 = 4;
pub const INVALID_ARGUMENT: i32 = 1;
pub const IO: i32 = 2;

pub struct Lwi {
    lib: Library,
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in paths")
}

impl Lwi {
    pub fn load() -> Lwi {
        let path = plugin_path();
        // SAFETY: liblwi.so has no unusual initialisers.
        let lib = unsafe { Library::new(&path) }
            .unwrap_or_else(|e| panic!("cannot load {}: {e} (run `make build`)", path.display()));
        Lwi { lib }
    }

    fn result(&self, status: i32) -> Result<(), Failure> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: signature from include/lwi.h; the string is valid until our next call.
        let message = unsafe {
            let f = self
                .lib
                .get::<unsafe extern "C" fn() -> *const c_char>(b"lwi_last_error\0")
                .expect("symbol");
            CStr::from_ptr(f()).to_string_lossy().into_owned()
        };
        Err(Failure { status, message })
    }

    pub fn convert(&self, input: &Path, output: &Path) -> Result<(), Failure> {
        let (i, o) = (c(input), c(output));
        // SAFETY: signature from include/lwi.h; strings outlive the call.
        let status = unsafe {
            self.lib
                .get::<unsafe extern "C" fn(*const c_char, *const c_char) -> i32>(
                    b"lwi_volume_convert\0",
                )
                .expect("symbol")(i.as_ptr(), o.as_ptr())
        };
        self.result(status)
    }

    /// Reads a volume and returns its dims (the handle is freed).
    pub fn read_dims(&self, path: &Path) -> Result<[i64; 3], Failure> {
        let p = c(path);
        let mut h: *mut c_void = std::ptr::null_mut();
        let mut dims = [0i64; 3];
        // SAFETY: signatures from include/lwi.h; the handle is freed before returning.
        unsafe {
            let read = self
                .lib
                .get::<unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> i32>(
                    b"lwi_volume_read\0",
                )
                .expect("symbol");
            self.result(read(p.as_ptr(), &mut h))?;
            let get = self
                .lib
                .get::<unsafe extern "C" fn(*mut c_void, *mut i64) -> i32>(b"lwi_volume_dims\0")
                .expect("symbol");
            let status = get(h, dims.as_mut_ptr());
            self.lib
                .get::<unsafe extern "C" fn(*mut c_void)>(b"lwi_volume_free\0")
                .expect("symbol")(h);
            self.result(status)?;
        }
        Ok(dims)
    }
}
