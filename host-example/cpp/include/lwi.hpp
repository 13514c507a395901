// lwi.hpp — RAII wrappers over the lwi C ABI (include/lwi.h), with errors as exceptions.
// The example a C++ host copies from: every handle owned by one object, every status checked.
#pragma once

#include <lwi.h>

#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>

namespace lwi {

/// A failed call: the status and lwi_last_error()'s message.
class Error : public std::runtime_error {
 public:
  Error(LwiStatus status, const std::string &message) : std::runtime_error(message), status_(status) {}
  LwiStatus status() const { return status_; }

 private:
  LwiStatus status_;
};

inline void check(LwiStatus status) {
  if (status != LWI_STATUS_OK) throw Error(status, lwi_last_error());
}

/// Refuses to run against a library built from another header.
inline void require_abi() {
  if (lwi_abi_version() != LWI_ABI_VERSION)
    throw Error(LWI_STATUS_INVALID_ARGUMENT, "liblwi.so implements ABI " + std::to_string(lwi_abi_version()) +
                                                 ", this program was built for " + std::to_string(LWI_ABI_VERSION));
}

/// `s` as a JSON string literal (quotes, backslashes and control characters escaped), for the
/// config documents a host composes.
inline std::string json_string(const std::string &s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

/// Progress: return false to cancel.
using ProgressFn = std::function<bool(const LwiProgress &)>;

namespace detail {
inline int32_t forward_progress(void *user, const LwiProgress *p) {
  auto *f = static_cast<ProgressFn *>(user);
  try {
    return (*f && !(*f)(*p)) ? 1 : 0;
  } catch (...) {
    return 1;  // an exception must not cross into the library: cancel instead
  }
}
}  // namespace detail

class Engine {
 public:
  explicit Engine(const std::string &options_json = "{}") { check(lwi_engine_create(options_json.c_str(), &engine_)); }
  ~Engine() { lwi_engine_free(engine_); }
  Engine(const Engine &) = delete;
  Engine &operator=(const Engine &) = delete;
  const LwiEngine *get() const { return engine_; }

  void init_train(const std::string &config_json, ProgressFn progress = {}) const {
    check(lwi_init_train(engine_, config_json.c_str(), detail::forward_progress, &progress));
  }
  void fine_tune(const std::string &config_json, ProgressFn progress = {}) const {
    check(lwi_fine_tune(engine_, config_json.c_str(), detail::forward_progress, &progress));
  }

 private:
  LwiEngine *engine_ = nullptr;
};

class Model {
 public:
  Model(const Engine &engine, const std::string &path) { check(lwi_model_load(engine.get(), path.c_str(), &model_)); }
  ~Model() { lwi_model_free(model_); }
  Model(const Model &) = delete;
  Model &operator=(const Model &) = delete;

  std::string info_json() const {
    const char *text = lwi_model_info_json(model_);
    if (!text) throw Error(LWI_STATUS_INTERNAL, lwi_last_error());
    return text;
  }

  /// Segments a volume file into a label file on the input's grid (format by extension).
  void segment_file(const std::string &in, const std::string &out, const std::string &options_json = "{}",
                    ProgressFn progress = {}) const {
    check(lwi_segment_file(model_, in.c_str(), out.c_str(), options_json.c_str(), detail::forward_progress, &progress));
  }

 private:
  LwiModel *model_ = nullptr;
};

}  // namespace lwi
