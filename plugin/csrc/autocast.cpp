// Autocast on CUDA or the CPU through libtorch's current API. tch's own autocast calls the
// deprecated at::autocast::{is_enabled,set_enabled}, which print warnings on every call, and cannot
// choose bfloat16. These two functions bracket an autocast region; they never throw.
#include <ATen/autocast_mode.h>

extern "C" {

// Enters autocast on CUDA (cuda != 0) or the CPU (cuda == 0; oneDNN's bfloat16 kernels) with
// float16 (bf16 == 0) or bfloat16 (bf16 != 0). Writes the previous state to `prev_enabled` and
// `prev_dtype` for lwi_autocast_exit. Returns 0, or -1 on failure.
int lwi_autocast_enter(int cuda, int bf16, int *prev_enabled, int *prev_dtype) {
  try {
    const auto device = cuda ? at::kCUDA : at::kCPU;
    *prev_enabled = at::autocast::is_autocast_enabled(device) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
    at::autocast::set_autocast_dtype(device, bf16 ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::increment_nesting();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Leaves the region entered by lwi_autocast_enter, restoring the previous state.
void lwi_autocast_exit(int cuda, int prev_enabled, int prev_dtype) {
  try {
    const auto device = cuda ? at::kCUDA : at::kCPU;
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(device, prev_enabled != 0);
    at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(prev_dtype));
  } catch (...) {
  }
}
}

extern "C" {

// Holds this thread's autocast cache open: the lower-precision copies autocast makes of weights
// (leaf tensors that require grad) stay cached across regions until lwi_autocast_cache_release,
// instead of being made again in each region.
void lwi_autocast_cache_hold() {
  try {
    at::autocast::increment_nesting();
  } catch (...) {
  }
}

// Ends lwi_autocast_cache_hold; the cache is cleared when no region or hold is left.
void lwi_autocast_cache_release() {
  try {
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
  } catch (...) {
  }
}
}
