//! Progress reports to the host's callback, which may also cancel.

use std::ffi::{CString, c_char, c_void};

/// One progress report of a long call. Strings are owned by the library and valid during the
/// callback only.
#[repr(C)]
pub struct LwiProgress {
    /// `sizeof(LwiProgress)` as the library was built; fields are only ever appended.
    pub struct_size: u32,
    /// What is running: "preprocess", "infer", "resample", "train", "validate", ...
    pub stage: *const c_char,
    pub done: u64,
    /// 0 when unknown.
    pub total: u64,
    /// Training epoch, or -1.
    pub epoch: i64,
    /// Loss and metric of the last step, or NaN.
    pub loss: f64,
    pub metric: f64,
    pub message: *const c_char,
    /// This process's rank in a data-parallel training job, or -1 for a single process.
    pub rank: i32,
}

/// Progress callback: return 0 to go on, anything else to cancel (the call then returns
/// `LWI_STATUS_CANCELLED` and leaves no partial output).
pub type LwiProgressFn =
    Option<unsafe extern "C" fn(user: *mut c_void, progress: *const LwiProgress) -> i32>;

/// Adapts a C progress callback to the engine's progress sink.
pub(crate) struct CallbackSink {
    pub(crate) callback: LwiProgressFn,
    pub(crate) user: *mut c_void,
}

impl lwi::events::Progress for CallbackSink {
    fn report(&mut self, e: &lwi::events::Event) -> bool {
        let Some(f) = self.callback else { return true };
        let stage = CString::new(e.stage).unwrap_or_default();
        let message = CString::new(e.message.replace('\0', " ")).unwrap_or_default();
        let p = LwiProgress {
            struct_size: std::mem::size_of::<LwiProgress>() as u32,
            stage: stage.as_ptr(),
            done: e.done,
            total: e.total,
            epoch: e.epoch.map_or(-1, |v| v as i64),
            loss: e.loss.unwrap_or(f64::NAN),
            metric: e.metric.unwrap_or(f64::NAN),
            message: message.as_ptr(),
            rank: e.rank.map_or(-1, |r| r as i32),
        };
        // SAFETY: the host promised a callable function; `p` and its strings live across the call.
        unsafe { f(self.user, &p) == 0 }
    }
}
