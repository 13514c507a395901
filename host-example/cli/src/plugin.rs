//! liblwi.so loaded at run time over its C ABI, as any host would load it: every export the
//! command calls is resolved once, with its type from include/lwi.h, when the library is loaded.

use libloading::Library;
use std::ffi::{CStr, CString, c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The header's constants (`ABI_VERSION`, `STATUS_*`, `DTYPE_*`, `SPACE_*`, `DTYPE_NAMES`,
/// `DTYPE_SIZES`) and its `LwiProgress` (build.rs): the whole table, of which the command uses a
/// part.
#[allow(dead_code)]
pub mod abi {
    include!(concat!(env!("OUT_DIR"), "/abi.rs"));
}

/// A volume's dims, RAS affine and voxels as f32.
pub type VoxelsF32 = ([i64; 3], [f64; 16], Vec<f32>);

/// A volume through the C ABI: dims, dtype code, RAS affine, voxel bytes.
type VolumeParts = ([i64; 3], i32, [f64; 16], Vec<u8>);

/// Opaque `LwiVolumeHandle*`, `LwiEngine*`, `LwiModel*`.
type Handle = *mut c_void;

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

type ProgressCallback = unsafe extern "C" fn(*mut c_void, *const abi::LwiProgress) -> i32;
type Str = *const c_char;

/// The exports the command calls, with their C types (include/lwi.h). Valid while the
/// [`Library`] they came from stays loaded, which [`Plugin`] guarantees by owning both.
struct Api {
    last_error: unsafe extern "C" fn() -> Str,
    version_json: unsafe extern "C" fn() -> Str,
    string_free: unsafe extern "C" fn(*mut c_char),
    volume_convert: unsafe extern "C" fn(Str, Str) -> i32,
    volume_read: unsafe extern "C" fn(Str, *mut Handle) -> i32,
    volume_read_series: unsafe extern "C" fn(Str, Str, *mut Handle) -> i32,
    volume_read_dicom_files: unsafe extern "C" fn(*const Str, usize, Str, *mut Handle) -> i32,
    volume_write: unsafe extern "C" fn(Handle, Str) -> i32,
    volume_dims: unsafe extern "C" fn(Handle, *mut i64) -> i32,
    volume_dtype: unsafe extern "C" fn(Handle, *mut i32) -> i32,
    volume_affine: unsafe extern "C" fn(Handle, i32, *mut f64) -> i32,
    volume_copy_voxels: unsafe extern "C" fn(Handle, *mut c_void, usize) -> i32,
    volume_free: unsafe extern "C" fn(Handle),
    dicom_series_json: unsafe extern "C" fn(Str, *mut *mut c_char) -> i32,
    engine_create: unsafe extern "C" fn(Str, *mut Handle) -> i32,
    engine_free: unsafe extern "C" fn(Handle),
    model_load: unsafe extern "C" fn(Handle, Str, *mut Handle) -> i32,
    model_info_json: unsafe extern "C" fn(Handle) -> Str,
    model_free: unsafe extern "C" fn(Handle),
    model_import: unsafe extern "C" fn(Str, Str, Str) -> i32,
    forward: unsafe extern "C" fn(Handle, Str, Str, Str) -> i32,
    segment_file:
        unsafe extern "C" fn(Handle, Str, Str, Str, Option<ProgressCallback>, *mut c_void) -> i32,
    evaluate: unsafe extern "C" fn(Str, Str, Str, *mut *mut c_char) -> i32,
    init_train: unsafe extern "C" fn(Handle, Str, Option<ProgressCallback>, *mut c_void) -> i32,
    fine_tune: unsafe extern "C" fn(Handle, Str, Option<ProgressCallback>, *mut c_void) -> i32,
    phantom_dataset: unsafe extern "C" fn(Str, Str) -> i32,
}

/// Resolves `lwi_<field>` for every field of [`Api`].
macro_rules! resolve {
    ($lib:expr, $($field:ident),* $(,)?) => {
        Api { $($field: {
            let name = concat!("lwi_", stringify!($field), "\0");
            // SAFETY: the field's type is the export's type in include/lwi.h, the header of the
            // ABI version checked just before.
            *unsafe { $lib.get(name.as_bytes()) }
                .map_err(|e| format!("symbol {} missing: {e}", name.trim_end_matches('\0')))?
        },)* }
    };
}

impl Api {
    fn resolve(lib: &Library) -> Result<Api, String> {
        Ok(resolve!(
            lib,
            last_error,
            version_json,
            string_free,
            volume_convert,
            volume_read,
            volume_read_series,
            volume_read_dicom_files,
            volume_write,
            volume_dims,
            volume_dtype,
            volume_affine,
            volume_copy_voxels,
            volume_free,
            dicom_series_json,
            engine_create,
            engine_free,
            model_load,
            model_info_json,
            model_free,
            model_import,
            forward,
            segment_file,
            evaluate,
            init_train,
            fine_tune,
            phantom_dataset,
        ))
    }
}

pub struct Plugin {
    api: Api,
    _lib: Library,
    pub path: PathBuf,
}

/// Where to find liblwi.so: `--plugin`, then `LWI_PLUGIN`, then beside this executable, then in
/// `../lib/` (the installed layout: `lwi/bin/lwi` beside `lwi/lib/liblwi.so` in the wheel).
pub fn locate(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("LWI_PLUGIN") {
        return PathBuf::from(p);
    }
    let exe_dir = exe_dir();
    let beside = exe_dir.join("liblwi.so");
    let installed = exe_dir.join("../lib/liblwi.so");
    if !beside.exists() && installed.exists() {
        return installed;
    }
    beside
}

/// The folder of this executable ("" if the system cannot say).
pub fn exe_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_default()
}

fn cstring(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn text(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

impl Plugin {
    /// Loads the library, refuses it unless its ABI version is the one this CLI was built for,
    /// and resolves every export.
    pub fn load(path: &Path) -> Result<Plugin, String> {
        // SAFETY: loading runs the library's initialisers; liblwi.so has no unusual ones.
        let lib = unsafe { Library::new(path) }
            .map_err(|e| format!("cannot load the lwi plugin {}: {e}", path.display()))?;
        // SAFETY: lwi_abi_version has this signature in every ABI version.
        let abi = unsafe { lib.get::<unsafe extern "C" fn() -> u32>(b"lwi_abi_version\0") }
            .map(|f| unsafe { f() })
            .map_err(|e| format!("{} is not an lwi plugin: {e}", path.display()))?;
        if abi != abi::ABI_VERSION {
            return Err(format!(
                "{} implements lwi ABI version {abi}, this lwi command needs version {}: use a matching liblwi.so",
                path.display(),
                abi::ABI_VERSION
            ));
        }
        let api = Api::resolve(&lib).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Plugin {
            api,
            _lib: lib,
            path: path.to_path_buf(),
        })
    }

    /// `lwi_last_error()`, read right after the failed call (frees and getters would not change it,
    /// but no other call may come between).
    fn last_error(&self) -> String {
        // SAFETY: lwi_last_error never returns NULL and the string lives until our next call.
        unsafe { CStr::from_ptr((self.api.last_error)()) }
            .to_string_lossy()
            .into_owned()
    }

    fn check(&self, status: i32) -> Result<(), PluginError> {
        if status == abi::STATUS_OK {
            Ok(())
        } else {
            Err(PluginError {
                status,
                message: self.last_error(),
            })
        }
    }

    /// A getter's string, copied; NULL (a broken library) is an internal error.
    ///
    /// SAFETY (callers): `s` is NULL or a string the library keeps alive for now.
    unsafe fn borrowed_text(&self, s: Str) -> Result<String, PluginError> {
        if s.is_null() {
            return Err(PluginError {
                status: abi::STATUS_INTERNAL,
                message: self.last_error(),
            });
        }
        // SAFETY: by the caller's contract.
        Ok(unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
    }

    /// Copies a string the library handed over, then gives it back to `lwi_string_free`.
    ///
    /// SAFETY (callers): `s` is a non-NULL string returned by this library and not yet freed.
    unsafe fn take_string(&self, s: *mut c_char) -> String {
        // SAFETY: by the caller's contract; freed once.
        unsafe {
            let text = CStr::from_ptr(s).to_string_lossy().into_owned();
            (self.api.string_free)(s);
            text
        }
    }

    pub fn version_json(&self) -> Result<String, PluginError> {
        // SAFETY: the string is owned by the library until it is unloaded.
        unsafe { self.borrowed_text((self.api.version_json)()) }
    }

    pub fn convert(&self, input: &Path, output: &Path) -> Result<(), PluginError> {
        let (i, o) = (cstring(input), cstring(output));
        // SAFETY: both strings outlive the call.
        self.check(unsafe { (self.api.volume_convert)(i.as_ptr(), o.as_ptr()) })
    }

    pub fn phantom(&self, out_dir: &Path, options_json: &str) -> Result<(), PluginError> {
        let (d, j) = (cstring(out_dir), text(options_json));
        // SAFETY: both strings outlive the call.
        self.check(unsafe { (self.api.phantom_dataset)(d.as_ptr(), j.as_ptr()) })
    }

    /// Reads a volume's voxels as f32 (x fastest) with its dims and RAS affine.
    pub fn volume_f32(&self, path: &Path) -> Result<VoxelsF32, PluginError> {
        let (dims, dtype, affine, bytes) = self.volume(path, true)?;
        let size = abi::DTYPE_SIZES[dtype as usize];
        let value = |b: &[u8]| -> f32 {
            match dtype {
                abi::DTYPE_UINT8 => b[0] as f32,
                abi::DTYPE_INT8 => b[0] as i8 as f32,
                abi::DTYPE_UINT16 => u16::from_le_bytes([b[0], b[1]]) as f32,
                abi::DTYPE_INT16 => i16::from_le_bytes([b[0], b[1]]) as f32,
                abi::DTYPE_UINT32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
                abi::DTYPE_INT32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
                abi::DTYPE_UINT64 => u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32,
                abi::DTYPE_INT64 => i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32,
                abi::DTYPE_FLOAT32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
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
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: the string outlives the call.
        self.check(unsafe { (self.api.volume_read)(p.as_ptr(), &mut h) })?;
        let (mut dims, mut dtype, mut affine) = ([0i64; 3], 0i32, [0f64; 16]);
        let mut bytes = Vec::new();
        // SAFETY: `h` is a live volume; the out pointers hold what the ABI writes (3 int64, one
        // int32, 16 doubles, the voxel bytes it was told of).
        let read = unsafe {
            (|| {
                self.check((self.api.volume_dims)(h, dims.as_mut_ptr()))?;
                self.check((self.api.volume_dtype)(h, &mut dtype))?;
                let ras = abi::SPACE_RAS;
                self.check((self.api.volume_affine)(h, ras, affine.as_mut_ptr()))?;
                if voxels {
                    let size = abi::DTYPE_SIZES.get(dtype as usize).copied().unwrap_or(1);
                    bytes = vec![0u8; dims.iter().product::<i64>() as usize * size];
                    let dst = bytes.as_mut_ptr().cast();
                    self.check((self.api.volume_copy_voxels)(h, dst, bytes.len()))?;
                }
                Ok(())
            })()
        };
        // SAFETY: a handle of this library, freed once.
        unsafe { (self.api.volume_free)(h) };
        read.map(|()| (dims, dtype, affine, bytes))
    }

    /// `lwi_model_import(checkpoint, options_json, out)`.
    pub fn import(
        &self,
        checkpoint: &Path,
        options_json: &str,
        out: &Path,
    ) -> Result<(), PluginError> {
        let (c, j, o) = (cstring(checkpoint), text(options_json), cstring(out));
        // SAFETY: the strings outlive the call.
        self.check(unsafe { (self.api.model_import)(c.as_ptr(), j.as_ptr(), o.as_ptr()) })
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
        let (p, r, j) = (cstring(pred), cstring(reference), text(options_json));
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: the strings outlive the call; the report is copied, then freed by lwi.
        unsafe {
            self.check((self.api.evaluate)(
                p.as_ptr(),
                r.as_ptr(),
                j.as_ptr(),
                &mut out,
            ))?;
            Ok(self.take_string(out))
        }
    }

    /// The DICOM series under `path`, as `lwi_dicom_series_json` describes them.
    pub fn dicom_series(&self, path: &Path) -> Result<String, PluginError> {
        let p = cstring(path);
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: the string outlives the call; the listing is copied, then freed by lwi.
        unsafe {
            self.check((self.api.dicom_series_json)(p.as_ptr(), &mut out))?;
            Ok(self.take_string(out))
        }
    }

    /// Converts one DICOM series to `output`: from one path (a folder, DICOMDIR or file) or from a
    /// list of files, chosen by Series Instance UID (empty: the largest CT/MR series).
    pub fn convert_dicom(
        &self,
        inputs: &[PathBuf],
        series_uid: &str,
        output: &Path,
    ) -> Result<(), PluginError> {
        let paths: Vec<CString> = inputs.iter().map(|p| cstring(p)).collect();
        let pointers: Vec<Str> = paths.iter().map(|p| p.as_ptr()).collect();
        let (u, o) = (text(series_uid), cstring(output));
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: the strings outlive the calls; the handle (NULL on failure, which the free
        // accepts) is freed once.
        unsafe {
            let status = match pointers.as_slice() {
                [one] => (self.api.volume_read_series)(*one, u.as_ptr(), &mut h),
                all => {
                    (self.api.volume_read_dicom_files)(all.as_ptr(), all.len(), u.as_ptr(), &mut h)
                }
            };
            self.check(status)?;
            let written = self.check((self.api.volume_write)(h, o.as_ptr()));
            (self.api.volume_free)(h);
            written
        }
    }

    /// `lwi_init_train` or `lwi_fine_tune` through a fresh engine on `device`.
    pub fn train(
        &self,
        fine_tune: bool,
        device: &str,
        config_json: &str,
        mut on_progress: &mut dyn FnMut(&ProgressEvent) -> bool,
    ) -> Result<(), PluginError> {
        let options = text(&serde_json::json!({ "device": device }).to_string());
        let config = text(config_json);
        let stage = if fine_tune {
            self.api.fine_tune
        } else {
            self.api.init_train
        };
        let mut engine: Handle = std::ptr::null_mut();
        // SAFETY: the strings and the callback state outlive the calls; the engine is freed once.
        unsafe {
            self.check((self.api.engine_create)(options.as_ptr(), &mut engine))?;
            let user = callback_state(&mut on_progress);
            let status = stage(engine, config.as_ptr(), Some(forward_progress), user);
            // The message first: nothing may run between the failed call and reading it.
            let result = self.check(status);
            (self.api.engine_free)(engine);
            result
        }
    }

    /// Creates an engine and loads a model through it; both are freed when the result drops.
    pub fn load_model(
        &self,
        path: &Path,
        engine_options: &str,
    ) -> Result<LoadedModel<'_>, PluginError> {
        let (p, options) = (cstring(path), text(engine_options));
        let mut loaded = LoadedModel {
            plugin: self,
            engine: std::ptr::null_mut(),
            model: std::ptr::null_mut(),
        };
        // SAFETY: the strings outlive the calls; the out pointers are LoadedModel's, which frees
        // both handles (NULL ones too, which the frees accept).
        unsafe {
            self.check((self.api.engine_create)(
                options.as_ptr(),
                &mut loaded.engine,
            ))?;
            self.check((self.api.model_load)(
                loaded.engine,
                p.as_ptr(),
                &mut loaded.model,
            ))?;
        }
        Ok(loaded)
    }
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
    engine: Handle,
    model: Handle,
}

/// The `user` pointer [`forward_progress`] is given: the caller's closure, alive for the call.
fn callback_state(on_progress: &mut &mut dyn FnMut(&ProgressEvent) -> bool) -> *mut c_void {
    on_progress as *mut &mut dyn FnMut(&ProgressEvent) -> bool as *mut c_void
}

unsafe extern "C" fn forward_progress(user: *mut c_void, p: *const abi::LwiProgress) -> i32 {
    // SAFETY: `user` is the `&mut dyn FnMut` of `callback_state`, alive for the call (segment_file
    // or train); `p` and its strings are valid during the callback.
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
            rank: (p.struct_size as usize >= std::mem::size_of::<abi::LwiProgress>()
                && p.rank >= 0)
                .then_some(p.rank as u32),
        };
        if f(&event) { 0 } else { 1 }
    }
}

impl LoadedModel<'_> {
    /// `lwi_model_info_json`, copied.
    pub fn info_json(&self) -> Result<String, PluginError> {
        // SAFETY: the string lives as long as the model.
        unsafe {
            let api = &self.plugin.api;
            self.plugin.borrowed_text((api.model_info_json)(self.model))
        }
    }

    /// `lwi_forward`: the raw network on the tensor `x` of `input`, every output into `output`.
    pub fn forward(&self, input: &Path, output: &Path) -> Result<(), PluginError> {
        let (i, o) = (cstring(input), cstring(output));
        let forward = self.plugin.api.forward;
        // SAFETY: the strings outlive the call; NULL options are the defaults.
        let status = unsafe { forward(self.model, i.as_ptr(), o.as_ptr(), std::ptr::null()) };
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
        let (i, o, j) = (cstring(input), cstring(output), text(options_json));
        let segment = self.plugin.api.segment_file;
        let user = callback_state(&mut on_progress);
        // SAFETY: the strings and the callback state outlive the call.
        let status = unsafe {
            segment(
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
        let api = &self.plugin.api;
        // SAFETY: handles made by this plugin (or NULL, which the frees accept), freed once.
        unsafe {
            (api.model_free)(self.model);
            (api.engine_free)(self.engine);
        }
    }
}
