//! liblwi.so loaded at run time over its C ABI, as any host would load it.

use libloading::{Library, Symbol};
use std::ffi::{CStr, CString, c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub const EXPECTED_ABI: u32 = parse_u32(env!("LWI_ABI_VERSION"));

const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut v = 0u32;
    while i < b.len() {
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}

/// Bytes per voxel of each `LwiDtype`, in enum order.
const DTYPE_SIZES: [usize; 10] = [1, 1, 2, 2, 4, 4, 8, 8, 4, 8];

/// A volume's dims, RAS affine and voxels as f32.
pub type VoxelsF32 = ([i64; 3], [f64; 16], Vec<f32>);

/// A volume through the C ABI: dims, dtype code, RAS affine, voxel bytes.
type VolumeParts = ([i64; 3], i32, [f64; 16], Vec<u8>);

/// Opaque `LwiVolumeHandle*`.
pub type VolumeHandle = *mut c_void;

/// A failure reported by the plugin: its status code and message.
#[derive(Debug)]
pub struct PluginError {
    pub status: i32,
    pub message: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (status {})", self.message, self.status)
    }
}

pub struct Plugin {
    lib: Library,
    pub path: PathBuf,
}

/// Where to find liblwi.so: `--plugin`, then `LWI_PLUGIN`, then beside this executable.
pub fn locate(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("LWI_PLUGIN") {
        return PathBuf::from(p);
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    exe_dir.join("liblwi.so")
}

fn cstring(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

impl Plugin {
    /// Loads the library and refuses it unless its ABI version is the one this CLI was built for.
    pub fn load(path: &Path) -> Result<Plugin, String> {
        // SAFETY: loading runs the library's initialisers; liblwi.so has no unusual ones.
        let lib = unsafe { Library::new(path) }
            .map_err(|e| format!("cannot load the lwi plugin {}: {e}", path.display()))?;
        let plugin = Plugin {
            lib,
            path: path.to_path_buf(),
        };
        // SAFETY: lwi_abi_version has this signature in every ABI version.
        let abi = unsafe { plugin.sym::<unsafe extern "C" fn() -> u32>(b"lwi_abi_version\0") }
            .map(|f| unsafe { f() });
        match abi {
            Ok(v) if v == EXPECTED_ABI => Ok(plugin),
            Ok(v) => Err(format!(
                "{} implements lwi ABI version {v}, this lwi command needs version {EXPECTED_ABI}: use a matching liblwi.so",
                path.display()
            )),
            Err(e) => Err(format!("{} is not an lwi plugin: {e}", path.display())),
        }
    }

    /// SAFETY: `T` must be the symbol's true type.
    unsafe fn sym<T>(&self, name: &[u8]) -> Result<Symbol<'_, T>, String> {
        // SAFETY: forwarded.
        unsafe { self.lib.get::<T>(name) }.map_err(|e| {
            format!(
                "symbol {} missing: {e}",
                String::from_utf8_lossy(&name[..name.len() - 1])
            )
        })
    }

    /// `lwi_last_error()`, read right after the failed call (frees and getters would not change it,
    /// but no other call may come between).
    fn last_error(&self) -> String {
        // SAFETY: lwi_last_error never returns NULL and the string lives until our next call.
        unsafe {
            match self.sym::<unsafe extern "C" fn() -> *const c_char>(b"lwi_last_error\0") {
                Ok(f) => CStr::from_ptr(f()).to_string_lossy().into_owned(),
                Err(e) => e,
            }
        }
    }

    fn check(&self, status: i32) -> Result<(), PluginError> {
        if status == 0 {
            Ok(())
        } else {
            Err(PluginError {
                status,
                message: self.last_error(),
            })
        }
    }

    fn missing(e: String) -> PluginError {
        PluginError {
            status: 9,
            message: e,
        }
    }

    pub fn version_json(&self) -> Result<String, PluginError> {
        // SAFETY: signature from include/lwi.h; the string is owned by the library.
        unsafe {
            let f = self
                .sym::<unsafe extern "C" fn() -> *const c_char>(b"lwi_version_json\0")
                .map_err(Self::missing)?;
            let p = f();
            if p.is_null() {
                return Err(PluginError {
                    status: 9,
                    message: self.last_error(),
                });
            }
            Ok(CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }

    pub fn convert(&self, input: &Path, output: &Path) -> Result<(), PluginError> {
        let (i, o) = (cstring(input), cstring(output));
        // SAFETY: signature from include/lwi.h; both strings outlive the call.
        let status = unsafe {
            let f = self
                .sym::<unsafe extern "C" fn(*const c_char, *const c_char) -> i32>(
                    b"lwi_volume_convert\0",
                )
                .map_err(Self::missing)?;
            f(i.as_ptr(), o.as_ptr())
        };
        self.check(status)
    }

    pub fn phantom(&self, out_dir: &Path, options_json: &str) -> Result<(), PluginError> {
        let (d, j) = (
            cstring(out_dir),
            CString::new(options_json).unwrap_or_default(),
        );
        // SAFETY: signature from include/lwi.h; both strings outlive the call.
        let status = unsafe {
            let f = self
                .sym::<unsafe extern "C" fn(*const c_char, *const c_char) -> i32>(
                    b"lwi_phantom_dataset\0",
                )
                .map_err(Self::missing)?;
            f(d.as_ptr(), j.as_ptr())
        };
        self.check(status)
    }

    /// Reads a volume's voxels as f32 (x fastest) with its dims and RAS affine.
    pub fn volume_f32(&self, path: &Path) -> Result<VoxelsF32, PluginError> {
        let (dims, dtype, affine, bytes) = self.volume(path, true)?;
        let size = DTYPE_SIZES[dtype as usize];
        let value = |b: &[u8]| -> f32 {
            match dtype {
                0 => b[0] as f32,
                1 => b[0] as i8 as f32,
                2 => u16::from_le_bytes([b[0], b[1]]) as f32,
                3 => i16::from_le_bytes([b[0], b[1]]) as f32,
                4 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
                5 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
                6 => u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32,
                7 => i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32,
                8 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                _ => f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32,
            }
        };
        Ok((dims, affine, bytes.chunks_exact(size).map(value).collect()))
    }

    /// Reads a volume's header facts: dims, dtype code, RAS affine.
    pub fn volume_info(&self, path: &Path) -> Result<([i64; 3], i32, [f64; 16]), PluginError> {
        let (dims, dtype, affine, _) = self.volume(path, false)?;
        Ok((dims, dtype, affine))
    }

    /// Reads a volume through the C ABI: dims, dtype code, RAS affine and (if asked) the voxel bytes.
    fn volume(&self, path: &Path, voxels: bool) -> Result<VolumeParts, PluginError> {
        let p = cstring(path);
        let mut h: VolumeHandle = std::ptr::null_mut();
        let (mut dims, mut dtype, mut affine) = ([0i64; 3], 0i32, [0f64; 16]);
        // SAFETY: signatures from include/lwi.h; out pointers are valid for the sizes the ABI states;
        // the handle is freed before returning.
        unsafe {
            let read = self
                .sym::<unsafe extern "C" fn(*const c_char, *mut VolumeHandle) -> i32>(
                    b"lwi_volume_read\0",
                )
                .map_err(Self::missing)?;
            self.check(read(p.as_ptr(), &mut h))?;
            let dims_f = self
                .sym::<unsafe extern "C" fn(VolumeHandle, *mut i64) -> i32>(b"lwi_volume_dims\0");
            let dtype_f = self
                .sym::<unsafe extern "C" fn(VolumeHandle, *mut i32) -> i32>(b"lwi_volume_dtype\0");
            let aff_f = self.sym::<unsafe extern "C" fn(VolumeHandle, i32, *mut f64) -> i32>(
                b"lwi_volume_affine\0",
            );
            let copy_f = self.sym::<unsafe extern "C" fn(VolumeHandle, *mut c_void, usize) -> i32>(
                b"lwi_volume_copy_voxels\0",
            );
            let free = self.sym::<unsafe extern "C" fn(VolumeHandle)>(b"lwi_volume_free\0");
            let mut bytes = Vec::new();
            let result = (|| {
                self.check(dims_f.map_err(Self::missing)?(h, dims.as_mut_ptr()))?;
                self.check(dtype_f.map_err(Self::missing)?(h, &mut dtype))?;
                self.check(aff_f.map_err(Self::missing)?(h, 0, affine.as_mut_ptr()))?;
                if voxels {
                    let size = DTYPE_SIZES.get(dtype as usize).copied().unwrap_or(1);
                    bytes = vec![0u8; dims.iter().product::<i64>() as usize * size];
                    self.check(copy_f.map_err(Self::missing)?(
                        h,
                        bytes.as_mut_ptr().cast(),
                        bytes.len(),
                    ))?;
                }
                Ok(())
            })();
            if let Ok(free) = free {
                free(h);
            }
            result?;
            Ok((dims, dtype, affine, bytes))
        }
    }

    /// `lwi_model_import(checkpoint, options_json, out)`.
    pub fn import(
        &self,
        checkpoint: &Path,
        options_json: &str,
        out: &Path,
    ) -> Result<(), PluginError> {
        let (c, j, o) = (
            cstring(checkpoint),
            CString::new(options_json).unwrap_or_default(),
            cstring(out),
        );
        // SAFETY: signature from include/lwi.h; the strings outlive the call.
        let status = unsafe {
            let f = self
                .sym::<unsafe extern "C" fn(*const c_char, *const c_char, *const c_char) -> i32>(
                    b"lwi_model_import\0",
                )
                .map_err(Self::missing)?;
            f(c.as_ptr(), j.as_ptr(), o.as_ptr())
        };
        self.check(status)
    }

    /// Loads a model file on the CPU and returns `lwi_model_info_json`.
    pub fn model_info(&self, path: &Path) -> Result<String, PluginError> {
        self.load_model(path, r#"{"device": "cpu"}"#)?.info_json()
    }

    /// `lwi_evaluate`: the JSON report.
    pub fn evaluate(
        &self,
        pred: &Path,
        reference: &Path,
        options_json: &str,
    ) -> Result<String, PluginError> {
        let (p, r, j) = (
            cstring(pred),
            cstring(reference),
            CString::new(options_json).unwrap_or_default(),
        );
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: signatures from include/lwi.h; the returned string is copied, then freed by lwi.
        unsafe {
            let f = self
                .sym::<unsafe extern "C" fn(
                    *const c_char,
                    *const c_char,
                    *const c_char,
                    *mut *mut c_char,
                ) -> i32>(b"lwi_evaluate\0")
                .map_err(Self::missing)?;
            self.check(f(p.as_ptr(), r.as_ptr(), j.as_ptr(), &mut out))?;
            Ok(self.take_string(out))
        }
    }

    /// Copies a string the library handed over, then gives it back to `lwi_string_free`.
    ///
    /// SAFETY (callers): `s` is a non-NULL string returned by this library and not yet freed.
    unsafe fn take_string(&self, s: *mut c_char) -> String {
        // SAFETY: by the caller's contract.
        let text = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
        if let Ok(free) =
            unsafe { self.sym::<unsafe extern "C" fn(*mut c_char)>(b"lwi_string_free\0") }
        {
            // SAFETY: a string from this library, freed once.
            unsafe { free(s) };
        }
        text
    }

    /// The DICOM series under `path`, as `lwi_dicom_series_json` describes them.
    pub fn dicom_series(&self, path: &Path) -> Result<String, PluginError> {
        let p = cstring(path);
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: signature from include/lwi.h; the returned string is copied, then freed by lwi.
        unsafe {
            let f = self
                .sym::<unsafe extern "C" fn(*const c_char, *mut *mut c_char) -> i32>(
                    b"lwi_dicom_series_json\0",
                )
                .map_err(Self::missing)?;
            self.check(f(p.as_ptr(), &mut out))?;
            Ok(self.take_string(out))
        }
    }

    /// Converts one DICOM series to `output`: from one path (a folder, DICOMDIR or file) or from a
    /// list of files, chosen by Series Instance UID (empty: the largest CT/MR series).
    pub fn convert_dicom(
        &self,
        inputs: &[std::path::PathBuf],
        series_uid: &str,
        output: &Path,
    ) -> Result<(), PluginError> {
        let paths: Vec<CString> = inputs.iter().map(|p| cstring(p)).collect();
        let pointers: Vec<*const c_char> = paths.iter().map(|p| p.as_ptr()).collect();
        let (u, o) = (
            CString::new(series_uid).unwrap_or_default(),
            cstring(output),
        );
        let mut h: VolumeHandle = std::ptr::null_mut();
        // SAFETY: signatures from include/lwi.h; the strings outlive the calls; the handle is freed
        // before returning.
        unsafe {
            let status = if let [one] = pointers.as_slice() {
                let read =
                    self.sym::<unsafe extern "C" fn(
                        *const c_char,
                        *const c_char,
                        *mut VolumeHandle,
                    ) -> i32>(b"lwi_volume_read_series\0")
                        .map_err(Self::missing)?;
                read(*one, u.as_ptr(), &mut h)
            } else {
                let read = self
                    .sym::<unsafe extern "C" fn(
                        *const *const c_char,
                        usize,
                        *const c_char,
                        *mut VolumeHandle,
                    ) -> i32>(b"lwi_volume_read_dicom_files\0")
                    .map_err(Self::missing)?;
                read(pointers.as_ptr(), pointers.len(), u.as_ptr(), &mut h)
            };
            let write = self
                .sym::<unsafe extern "C" fn(VolumeHandle, *const c_char) -> i32>(
                    b"lwi_volume_write\0",
                )
                .map_err(Self::missing)?;
            let free = self
                .sym::<unsafe extern "C" fn(VolumeHandle)>(b"lwi_volume_free\0")
                .map_err(Self::missing)?;
            self.check(status)?;
            let written = self.check(write(h, o.as_ptr()));
            free(h);
            written
        }
    }

    /// `lwi_init_train` (stage "init") or `lwi_fine_tune` through a fresh engine on `device`.
    pub fn train(
        &self,
        fine_tune: bool,
        device: &str,
        config_json: &str,
        mut on_progress: &mut dyn FnMut(&ProgressEvent) -> bool,
    ) -> Result<(), PluginError> {
        let options =
            CString::new(serde_json::json!({ "device": device }).to_string()).unwrap_or_default();
        let config = CString::new(config_json).unwrap_or_default();
        let name: &[u8] = if fine_tune {
            b"lwi_fine_tune\0"
        } else {
            b"lwi_init_train\0"
        };
        let mut engine: *mut c_void = std::ptr::null_mut();
        // SAFETY: signatures from include/lwi.h; the engine is freed before returning; the callback
        // state outlives the call.
        unsafe {
            let create = self
                .sym::<unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> i32>(
                    b"lwi_engine_create\0",
                )
                .map_err(Self::missing)?;
            self.check(create(options.as_ptr(), &mut engine))?;
            let f = self
                .sym::<unsafe extern "C" fn(
                    *mut c_void,
                    *const c_char,
                    Option<ProgressCallback>,
                    *mut c_void,
                ) -> i32>(name)
                .map_err(Self::missing)?;
            let user =
                &mut on_progress as *mut &mut dyn FnMut(&ProgressEvent) -> bool as *mut c_void;
            let status = f(engine, config.as_ptr(), Some(forward_progress), user);
            // The message first: nothing may run between the failed call and reading it.
            let result = self.check(status);
            if let Ok(free) = self.sym::<unsafe extern "C" fn(*mut c_void)>(b"lwi_engine_free\0") {
                free(engine);
            }
            result
        }
    }

    /// Creates an engine and loads a model through it; both are freed when the result drops.
    pub fn load_model(
        &self,
        path: &Path,
        engine_options: &str,
    ) -> Result<LoadedModel<'_>, PluginError> {
        let p = cstring(path);
        let options = CString::new(engine_options).unwrap_or_default();
        let mut loaded = LoadedModel {
            plugin: self,
            engine: std::ptr::null_mut(),
            model: std::ptr::null_mut(),
        };
        // SAFETY: signatures from include/lwi.h; out pointers are valid; LoadedModel frees both.
        unsafe {
            let create = self
                .sym::<unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> i32>(
                    b"lwi_engine_create\0",
                )
                .map_err(Self::missing)?;
            self.check(create(options.as_ptr(), &mut loaded.engine))?;
            let load = self
                .sym::<unsafe extern "C" fn(*mut c_void, *const c_char, *mut *mut c_void) -> i32>(
                    b"lwi_model_load\0",
                )
                .map_err(Self::missing)?;
            self.check(load(loaded.engine, p.as_ptr(), &mut loaded.model))?;
        }
        Ok(loaded)
    }
}

/// The C `LwiProgress` (include/lwi.h).
#[repr(C)]
pub struct Progress {
    pub struct_size: u32,
    pub stage: *const c_char,
    pub done: u64,
    pub total: u64,
    pub epoch: i64,
    pub loss: f64,
    pub metric: f64,
    pub message: *const c_char,
    pub rank: i32,
}

/// What a progress callback is told, in Rust terms.
pub struct ProgressEvent<'a> {
    pub stage: &'a str,
    pub done: u64,
    pub total: u64,
    pub epoch: Option<i64>,
    pub loss: Option<f64>,
    pub metric: Option<f64>,
    pub message: &'a str,
    /// The rank of a data-parallel training job's process, if it is one.
    pub rank: Option<u32>,
}

/// An engine and a model loaded through it.
pub struct LoadedModel<'a> {
    plugin: &'a Plugin,
    engine: *mut c_void,
    model: *mut c_void,
}

type ProgressCallback = unsafe extern "C" fn(*mut c_void, *const Progress) -> i32;

unsafe extern "C" fn forward_progress(user: *mut c_void, p: *const Progress) -> i32 {
    // SAFETY: `user` is the `&mut dyn FnMut` passed by segment_file, alive for the call; `p` and its
    // strings are valid during the callback.
    unsafe {
        let f = &mut *(user as *mut &mut dyn FnMut(&ProgressEvent) -> bool);
        let p = &*p;
        let text = |s: *const c_char| {
            if s.is_null() {
                ""
            } else {
                CStr::from_ptr(s).to_str().unwrap_or("")
            }
        };
        let finite = |v: f64| v.is_finite().then_some(v);
        let event = ProgressEvent {
            stage: text(p.stage),
            done: p.done,
            total: p.total,
            epoch: (p.epoch >= 0).then_some(p.epoch),
            loss: finite(p.loss),
            metric: finite(p.metric),
            message: text(p.message),
            // a field appended after the first ABI: read only when the library's struct has it
            rank: (p.struct_size as usize >= std::mem::size_of::<Progress>() && p.rank >= 0)
                .then_some(p.rank as u32),
        };
        if f(&event) { 0 } else { 1 }
    }
}

impl LoadedModel<'_> {
    /// `lwi_model_info_json`, copied.
    pub fn info_json(&self) -> Result<String, PluginError> {
        // SAFETY: signature from include/lwi.h; the string lives as long as the model.
        unsafe {
            let f = self
                .plugin
                .sym::<unsafe extern "C" fn(*mut c_void) -> *const c_char>(b"lwi_model_info_json\0")
                .map_err(Plugin::missing)?;
            let text = f(self.model);
            if text.is_null() {
                return Err(PluginError {
                    status: 9,
                    message: self.plugin.last_error(),
                });
            }
            Ok(CStr::from_ptr(text).to_string_lossy().into_owned())
        }
    }

    /// `lwi_forward`: the raw network on the tensor `x` of `input`, every output into `output`.
    pub fn forward(&self, input: &Path, output: &Path) -> Result<(), PluginError> {
        let (i, o) = (cstring(input), cstring(output));
        // SAFETY: signature from include/lwi.h; the strings outlive the call.
        let status = unsafe {
            let f = self
                .plugin
                .sym::<unsafe extern "C" fn(
                    *mut c_void,
                    *const c_char,
                    *const c_char,
                    *const c_char,
                ) -> i32>(b"lwi_forward\0")
                .map_err(Plugin::missing)?;
            f(self.model, i.as_ptr(), o.as_ptr(), std::ptr::null())
        };
        self.plugin.check(status)
    }

    /// `lwi_segment_file`; `on_progress` returns false to cancel.
    pub fn segment_file(
        &self,
        input: &Path,
        output: &Path,
        options_json: &str,
        mut on_progress: &mut dyn FnMut(&ProgressEvent) -> bool,
    ) -> Result<(), PluginError> {
        let (i, o, j) = (
            cstring(input),
            cstring(output),
            CString::new(options_json).unwrap_or_default(),
        );
        // SAFETY: signature from include/lwi.h; the strings and the callback state outlive the call.
        let status = unsafe {
            let f = self
                .plugin
                .sym::<unsafe extern "C" fn(
                    *mut c_void,
                    *const c_char,
                    *const c_char,
                    *const c_char,
                    Option<ProgressCallback>,
                    *mut c_void,
                ) -> i32>(b"lwi_segment_file\0")
                .map_err(Plugin::missing)?;
            let user =
                &mut on_progress as *mut &mut dyn FnMut(&ProgressEvent) -> bool as *mut c_void;
            f(
                self.model,
                i.as_ptr(),
                o.as_ptr(),
                j.as_ptr(),
                Some(forward_progress),
                user,
            )
        };
        self.plugin.check(status)
    }
}

impl Drop for LoadedModel<'_> {
    fn drop(&mut self) {
        // SAFETY: handles made by this plugin (or NULL, which the frees accept), freed once.
        unsafe {
            if let Ok(f) = self
                .plugin
                .sym::<unsafe extern "C" fn(*mut c_void)>(b"lwi_model_free\0")
            {
                f(self.model);
            }
            if let Ok(f) = self
                .plugin
                .sym::<unsafe extern "C" fn(*mut c_void)>(b"lwi_engine_free\0")
            {
                f(self.engine);
            }
        }
    }
}
