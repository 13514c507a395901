//! Live handles: every engine, model and volume handed to a host is recorded here by address
//! until it is freed, so a freed, never-made or wrong-kind pointer is refused with
//! `LWI_STATUS_INVALID_ARGUMENT` instead of being read, and a double free is a no-op.
//!
//! Each handle is reference-counted: a call borrows a clone for its duration, so a host that frees
//! a model while another thread is still segmenting with it does not pull memory out from under
//! that call (the model goes away when the call ends). A new handle that happens to reuse a freed
//! address is a different live handle; that reuse cannot be told apart from a valid pointer.

use lwi::Error;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

type Live = HashMap<usize, Arc<dyn Any + Send + Sync>>;

static LIVE: LazyLock<Mutex<Live>> = LazyLock::new(Default::default);

fn live() -> MutexGuard<'static, Live> {
    // A panic while the lock was held cannot leave the map half-updated (single insert/remove).
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers `value` and returns the opaque pointer the host holds.
pub(crate) fn hand_out<T: Any + Send + Sync>(value: T) -> *mut T {
    let value = Arc::new(value);
    let ptr = Arc::as_ptr(&value) as *mut T;
    live().insert(ptr as usize, value);
    ptr
}

/// The live handle behind `ptr`, kept alive while the caller holds it.
pub(crate) fn borrow<T: Any + Send + Sync>(ptr: *const T, what: &str) -> lwi::Result<Arc<T>> {
    if ptr.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    let found = live().get(&(ptr as usize)).cloned();
    match found {
        None => Err(Error::invalid(format!(
            "{what} is not a live handle (already freed, or not made by lwi)"
        ))),
        Some(any) => any
            .downcast::<T>()
            .map_err(|_| Error::invalid(format!("{what} is a handle of another kind"))),
    }
}

/// Forgets the handle behind `ptr`; its value is dropped once no call is using it. Returns an
/// error for a pointer that is not a live handle of this kind (the handle is then left alone).
pub(crate) fn release<T: Any + Send + Sync>(ptr: *const T, what: &str) -> lwi::Result<()> {
    let mut map = live();
    match map.get(&(ptr as usize)) {
        None => Err(Error::invalid(format!(
            "{what} is not a live handle (freed twice, or not made by lwi)"
        ))),
        Some(any) if !any.is::<T>() => Err(Error::invalid(format!(
            "{what} is a handle of another kind"
        ))),
        Some(_) => {
            let value = map.remove(&(ptr as usize));
            drop(map); // drop the value (possibly a large model) outside the lock
            drop(value);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_unknown_and_wrong_kind_pointers_are_refused() {
        let a = hand_out(7u32);
        assert_eq!(*borrow(a, "a").unwrap(), 7);
        let wrong = a as *const u64;
        assert!(
            borrow(wrong, "a")
                .unwrap_err()
                .message
                .contains("another kind")
        );
        assert!(release(wrong, "a").is_err());
        release(a, "a").unwrap();
        assert!(
            borrow(a, "a")
                .unwrap_err()
                .message
                .contains("not a live handle")
        );
        assert!(release(a, "a").unwrap_err().message.contains("freed twice"));
        let stack = 5u32;
        assert!(borrow(&stack as *const u32, "s").is_err());
    }

    #[test]
    fn a_value_in_use_outlives_its_free() {
        let h = hand_out(String::from("model"));
        let in_use = borrow(h, "m").unwrap();
        release(h, "m").unwrap();
        assert_eq!(*in_use, "model");
        assert!(borrow(h, "m").is_err());
    }
}
