// Data-parallel collectives from libtorch's own c10d: a TCPStore rendezvous, ProcessGroupGloo
// (CPU, or CUDA tensors staged through the host) or ProcessGroupNCCL (one GPU per rank), and
// bucketed all-reduce / broadcast / barrier. One process group per process, held here.
//
// Every function catches C++ exceptions and writes the message to `err` (NUL-terminated, at most
// `len` bytes); 0 = success, -1 = failure. Tensors cross as tch's `at::Tensor*`.
//
// The store keys are torch.distributed's default group's (TCPStore -> "default_pg" -> "0/" ->
// "cpu/" | "cuda/"), and rank 0 sets the group's sequence number as init_process_group does, so a
// rank behaves as a torch.distributed peer would. gloo types are only held by pointer here: the
// headers (Debian's libgloo-dev) need not be the exact revision libtorch was built from.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LWI_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <ATen/ATen.h>
#include <c10/util/Logging.h>
#include <torch/csrc/autograd/custom_function.h>

#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {
struct Group {
  int rank = 0, world = 1;
  bool nccl = false;
  int device_index = -1;
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  c10::intrusive_ptr<c10d::Backend> backend;
};
std::unique_ptr<Group> group;

void put(char* err, size_t len, const std::string& m) {
  if (err && len) {
    size_t n = std::min(len - 1, m.size());
    std::memcpy(err, m.data(), n);
    err[n] = 0;
  }
}

template <class F>
int guard(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    put(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    put(err, len, e.what());
  } catch (...) {
    put(err, len, "unknown C++ exception");
  }
  return -1;
}

// While a rank waits for the others to join, the store's client logs every retry and its final
// failure, each with a C++ stack trace: noise beside lwi's own error, which carries the same
// message. c10's log level is raised to fatal-only for the join and restored after; a level the
// user set with TORCH_CPP_LOG_LEVEL is left alone.
struct QuietJoin {
  int before = FLAGS_caffe2_log_level;
  bool quiet = std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr && before < c10::GLOG_FATAL;
  QuietJoin() {
    if (quiet) FLAGS_caffe2_log_level = c10::GLOG_FATAL;
  }
  ~QuietJoin() {
    if (quiet) FLAGS_caffe2_log_level = before;
  }
};

Group& need() {
  TORCH_CHECK(group, "no process group (lwi_dist_init was not called)");
  return *group;
}

// A per-call limit in ms for an operation's options; 0 keeps the group's.
std::chrono::milliseconds limit(int64_t timeout_ms) {
  return timeout_ms > 0 ? std::chrono::milliseconds(timeout_ms) : c10d::kUnsetTimeout;
}

// The same for Work::wait, where 0 means no limit of its own.
std::chrono::milliseconds wait_limit(int64_t timeout_ms) {
  return timeout_ms > 0 ? std::chrono::milliseconds(timeout_ms) : kNoTimeout;
}

// Consecutive tensors of one dtype and device, at most `cap` bytes per bucket.
std::vector<std::vector<at::Tensor>> buckets(at::Tensor* const* ts, size_t n, int64_t cap) {
  std::vector<std::vector<at::Tensor>> out;
  int64_t bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = *ts[i];
    TORCH_CHECK(t.defined(), "undefined tensor at index ", i);
    int64_t b = t.numel() * t.element_size();
    if (out.empty() || bytes + b > cap || out.back().front().scalar_type() != t.scalar_type() ||
        out.back().front().device() != t.device()) {
      out.emplace_back();
      bytes = 0;
    }
    out.back().push_back(t);
    bytes += b;
  }
  return out;
}

at::Tensor flatten(const std::vector<at::Tensor>& b) {
  if (b.size() == 1 && b[0].is_contiguous()) return b[0];  // in place, no copy
  std::vector<at::Tensor> flat;
  for (auto& t : b) flat.push_back(t.reshape({-1}));
  return at::cat(flat);
}

void unflatten(const at::Tensor& flat, std::vector<at::Tensor>& b) {
  if (b.size() == 1 && flat.is_same(b[0])) return;
  int64_t off = 0;
  for (auto& t : b) {
    t.copy_(flat.narrow(0, off, t.numel()).view(t.sizes()));
    off += t.numel();
  }
}

// Starts `op` on each bucket of the tensors (flattened), then waits for each in turn, applies
// `done` to its flat tensor and copies it back.
template <class Op, class Done>
void in_buckets(at::Tensor* const* ts, size_t n, int64_t bucket_bytes, int64_t timeout_ms, Op op,
                Done done) {
  auto bs = buckets(ts, n, bucket_bytes);
  std::vector<at::Tensor> flats;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (auto& b : bs) {
    flats.push_back(flatten(b));
    std::vector<at::Tensor> one{flats.back()};
    works.push_back(op(one));
  }
  for (size_t i = 0; i < bs.size(); ++i) {
    works[i]->wait(wait_limit(timeout_ms));
    done(flats[i]);
    unflatten(flats[i], bs[i]);
  }
}

void gloo_backend(Group& d, const c10::intrusive_ptr<c10d::Store>& store,
                  std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  bool lazy = c10d::getDefaultGlooLazyInit();
  // As torch.distributed: GLOO_SOCKET_IFNAME (a comma list) names the interfaces, else the
  // hostname's address.
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifname && std::strlen(ifname) > 0) {
    std::stringstream ss(ifname);
    std::string one;
    while (std::getline(ss, one, ','))
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(one, lazy));
  } else {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice(lazy));
  }
  opts->threads = static_cast<int>(opts->devices.size()) * 2;
  opts->group_name = "0";
  d.backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, d.rank, d.world, opts);
  d.pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::GLOO, d.backend);
  d.pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::GLOO, d.backend);
  d.pg->setDefaultBackend(c10d::ProcessGroup::GLOO);
}

void nccl_backend(Group& d, const c10::intrusive_ptr<c10d::Store>& store,
                  std::chrono::milliseconds timeout) {
#ifdef LWI_WITH_NCCL
  TORCH_CHECK(d.device_index >= 0, "nccl needs a CUDA device");
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(d.device_index));
  auto opts = c10d::ProcessGroupNCCL::Options::create(false);
  opts->timeout = timeout;
  opts->group_name = "0";
  d.backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, d.rank, d.world, opts);
  d.pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::NCCL, d.backend);
  d.pg->setDefaultBackend(c10d::ProcessGroup::NCCL);
#else
  (void)d, (void)store, (void)timeout;
  TORCH_CHECK(false, "this build has no NCCL (its libtorch had no CUDA headers): use gloo");
#endif
}
}  // namespace

// Sums `t` in place over the ranks within `timeout_ms`.
void sum_everywhere(at::Tensor& t, int64_t timeout_ms) {
  c10d::AllreduceOptions o;
  o.timeout = limit(timeout_ms);
  std::vector<at::Tensor> one{t};
  need().backend->allreduce(one, o)->wait(wait_limit(timeout_ms));
}

// BatchNorm in training over the batches of every rank together (PyTorch's SyncBatchNorm): the
// mean and the variance from sums over all ranks (two passes, as exact as one process's), and in
// the backward pass the sums of dy and dy·x̂ over all ranks, so that the gradients averaged over
// the ranks are those of the whole batch in one process. Computed in float32.
struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static std::vector<int64_t> reduced(const at::Tensor& x) {
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < x.dim(); ++d)
      if (d != 1) dims.push_back(d);
    return dims;
  }
  static std::vector<int64_t> per_channel(const at::Tensor& x) {
    std::vector<int64_t> shape(x.dim(), 1);
    shape[1] = x.size(1);
    return shape;
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias,
                            at::Tensor running_mean, at::Tensor running_var, double momentum,
                            double eps, int64_t timeout_ms) {
    auto xf = x.to(at::kFloat);
    auto dims = reduced(xf);
    auto shape = per_channel(xf);
    int64_t c = xf.size(1);
    auto first = at::cat({xf.sum(dims), at::full({1}, double(xf.numel() / c), xf.options())});
    sum_everywhere(first, timeout_ms);
    auto n = first[c];
    auto mean = first.narrow(0, 0, c) / n;
    auto centred = xf - mean.view(shape);
    auto squares = centred.square().sum(dims);
    sum_everywhere(squares, timeout_ms);
    auto var = squares / n;
    auto invstd = (var + eps).rsqrt();
    {
      at::NoGradGuard no_grad;
      double count = n.item<double>();
      running_mean.mul_(1 - momentum).add_(mean.to(running_mean.scalar_type()) * momentum);
      auto unbiased = var * (count / std::max(count - 1, 1.0));
      running_var.mul_(1 - momentum).add_(unbiased.to(running_var.scalar_type()) * momentum);
    }
    auto xhat = centred * invstd.view(shape);
    ctx->save_for_backward({xhat, weight, invstd});
    ctx->saved_data["n"] = n.item<double>();
    ctx->saved_data["timeout_ms"] = timeout_ms;
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    return xhat * weight.to(at::kFloat).view(shape) + bias.to(at::kFloat).view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto xhat = saved[0], weight = saved[1].to(at::kFloat), invstd = saved[2];
    double n = ctx->saved_data["n"].toDouble();
    int64_t timeout_ms = ctx->saved_data["timeout_ms"].toInt();
    auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    auto dy = grads[0].to(at::kFloat);
    auto dims = reduced(dy);
    auto shape = per_channel(dy);
    int64_t c = dy.size(1);
    auto sum_dy = dy.sum(dims), sum_dy_xhat = (dy * xhat).sum(dims);
    auto both = at::cat({sum_dy, sum_dy_xhat});
    sum_everywhere(both, timeout_ms);
    auto all_dy = both.narrow(0, 0, c).view(shape), all_dy_xhat = both.narrow(0, c, c).view(shape);
    auto dx = (weight * invstd).view(shape) * (dy - (all_dy + xhat * all_dy_xhat) / n);
    return {dx.to(dtype), sum_dy_xhat, sum_dy, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

extern "C" {
// `backend` "gloo" or "nccl"; rank 0 hosts the store when `store_server`.
int lwi_dist_init(const char* backend, const char* addr, int port, int rank, int world,
                  int store_server, int device_index, int64_t timeout_ms, char* err, size_t len) {
  return guard(err, len, [&] {
    TORCH_CHECK(!group, "a process group already exists in this process");
    TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, "rank ", rank, " is not in [0, ", world,
                ")");
    std::string be(backend ? backend : "gloo");
    TORCH_CHECK(be == "gloo" || be == "nccl", "unknown backend '", be, "'");
    auto d = std::make_unique<Group>();
    d->rank = rank;
    d->world = world;
    d->nccl = be == "nccl";
    d->device_index = device_index;
    std::chrono::milliseconds timeout(timeout_ms);
    QuietJoin quiet;
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(port);
    o.isServer = store_server != 0;
    o.numWorkers = static_cast<size_t>(world);
    o.waitWorkers = true;
    o.timeout = timeout;
    o.multiTenant = true;  // as torch.distributed's rendezvous
    d->store = c10::make_intrusive<c10d::TCPStore>(std::string(addr ? addr : ""), o);
    auto pg_store = c10::make_intrusive<c10d::PrefixStore>(
        "0/", c10::make_intrusive<c10d::PrefixStore>("default_pg", d->store));
    auto be_store = c10::make_intrusive<c10d::PrefixStore>(d->nccl ? "cuda/" : "cpu/", pg_store);
    d->pg = c10::make_intrusive<c10d::ProcessGroup>(pg_store, rank, world);
    if (d->nccl)
      nccl_backend(*d, be_store, timeout);
    else
      gloo_backend(*d, be_store, timeout);
    d->backend->setSequenceNumberForGroup();
    d->pg->setGroupName("0");
    group = std::move(d);
  });
}

// Sums in place (then divides by the world size when `average`), in buckets of at most
// `bucket_bytes`, all queued before the first wait.
int lwi_dist_all_reduce(at::Tensor* const* ts, size_t n, int64_t bucket_bytes, int average,
                        int64_t timeout_ms, char* err, size_t len) {
  return guard(err, len, [&] {
    Group& d = need();
    c10d::AllreduceOptions o;
    o.timeout = limit(timeout_ms);
    bool divide = average && d.world > 1;
    in_buckets(
        ts, n, bucket_bytes, timeout_ms,
        [&](std::vector<at::Tensor>& one) { return d.backend->allreduce(one, o); },
        [&](at::Tensor& flat) {
          if (divide) flat.div_(d.world);
        });
  });
}

// Overwrites the tensors with rank `root`'s, bucketed as lwi_dist_all_reduce.
int lwi_dist_broadcast(at::Tensor* const* ts, size_t n, int root, int64_t bucket_bytes,
                       int64_t timeout_ms, char* err, size_t len) {
  return guard(err, len, [&] {
    Group& d = need();
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = limit(timeout_ms);
    in_buckets(
        ts, n, bucket_bytes, timeout_ms,
        [&](std::vector<at::Tensor>& one) { return d.backend->broadcast(one, o); },
        [](at::Tensor&) {});
  });
}

int lwi_dist_barrier(int64_t timeout_ms, char* err, size_t len) {
  return guard(err, len, [&] {
    Group& d = need();
    c10d::BarrierOptions o;
    o.timeout = limit(timeout_ms);
    if (d.nccl) o.device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(d.device_index));
    d.backend->barrier(o)->wait(wait_limit(timeout_ms));
  });
}

// Makes CUDA device `index` the calling thread's current one (the group may have been joined on
// another thread); a no-op without NCCL.
int lwi_dist_use_device(int index, char* err, size_t len) {
  return guard(err, len, [&] {
#ifdef LWI_WITH_NCCL
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(index));
#else
    (void)index;
#endif
  });
}

// Whether NCCL can run: compiled in, and libtorch_cuda loaded with liblwi (its libtorch.so needs it in
// a CUDA build), so the weak references into it (build.rs) are bound. Against a CPU-only libtorch: 0.
int lwi_dist_nccl_usable(void) {
#ifdef LWI_WITH_NCCL
  void* cuda = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
  if (!cuda) return 0;
  dlclose(cuda);
  return 1;
#else
  return 0;
#endif
}

// Whether a group of more than one rank exists (training batch norm is then synchronised).
int lwi_dist_active(void) { return group && group->world > 1 ? 1 : 0; }

// Training BatchNorm over every rank's batch (SyncBatchNorm above); the result in `*out`.
int lwi_dist_sync_batch_norm(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias,
                             at::Tensor* running_mean, at::Tensor* running_var, double momentum,
                             double eps, int64_t timeout_ms, at::Tensor** out, char* err,
                             size_t len) {
  return guard(err, len, [&] {
    need();
    *out = new at::Tensor(SyncBatchNorm::apply(*x, *weight, *bias, *running_mean, *running_var,
                                               momentum, eps, timeout_ms));
  });
}

// Ends the group (a later lwi_dist_init may start another).
void lwi_dist_destroy(void) {
  try {
    if (group && group->backend) group->backend->shutdown();
  } catch (...) {
  }
  group.reset();
}
}  // extern "C"
