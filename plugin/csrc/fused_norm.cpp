// Fused instance normalisation + residual add + LeakyReLU for CUDA inference.
//
// ATen runs UNETR's `leaky_relu(instance_norm(a) [+ instance_norm(b) | + b])` as separate kernels
// (statistics, normalise, normalise the shortcut, add, activate): five to seven passes over memory,
// which is most of a GPU forward pass. Here the statistics take one read of each input and the rest
// is one kernel: read a (and b), write y once.
//
// The kernels are CUDA C compiled at first use with NVRTC and launched through the CUDA driver API.
// Both libraries are opened with dlopen, so liblwi.so needs neither to load, and a machine without
// them (or without a GPU) simply reports the fused path unavailable; lwi then runs ATen's kernels.
// Work is queued on the legacy default stream, the stream libtorch uses unless a host sets another.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <dlfcn.h>
#include <glob.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace {

const char* kSource = R"CUDA(
typedef unsigned short u16;

struct F32 {
  typedef float T;
  static __device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
  static __device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
};
struct F16 {
  typedef u16 T;
  static __device__ __forceinline__ float load(const u16* p, long long i) {
    float f;
    asm("{cvt.f32.f16 %0, %1;}" : "=f"(f) : "h"(p[i]));
    return f;
  }
  static __device__ __forceinline__ void store(u16* p, long long i, float v) {
    u16 h;
    asm("{cvt.rn.f16.f32 %0, %1;}" : "=h"(h) : "f"(v));
    p[i] = h;
  }
};
struct BF16 {
  typedef u16 T;
  static __device__ __forceinline__ float load(const u16* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
  }
  // Round to nearest even; NaN stays NaN.
  static __device__ __forceinline__ void store(u16* p, long long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = (u16)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (u16)(u >> 16);
  }
};

// Chan et al.'s merge of two (count, mean, M2) partial statistics into the first.
__device__ __forceinline__ void merge(float& n, float& mean, float& m2, float nb, float mb, float m2b) {
  if (nb == 0.f) return;
  float na = n;
  n = na + nb;
  float d = mb - mean;
  mean += d * (nb / n);
  m2 += m2b + d * d * (na * nb / n);
}

// Partial statistics of row blockIdx.y (one (batch, channel) pair, S voxels) over the blockIdx.x-th
// share of it: Welford per thread, merged across the block; part[row][block] = (count, mean, M2).
template <class D>
__device__ void row_stats(const typename D::T* x, long long S, float* part) {
  __shared__ float sn[256], sm[256], s2[256];
  const typename D::T* p = x + (long long)blockIdx.y * S;
  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < S; i += (long long)gridDim.x * blockDim.x) {
    float v = D::load(p, i);
    n += 1.f;
    float d = v - mean;
    mean += d / n;
    m2 += d * (v - mean);
  }
  int t = threadIdx.x;
  sn[t] = n; sm[t] = mean; s2[t] = m2;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) merge(sn[t], sm[t], s2[t], sn[t + s], sm[t + s], s2[t + s]);
    __syncthreads();
  }
  if (t == 0) {
    float* out = part + ((long long)blockIdx.y * gridDim.x + blockIdx.x) * 3;
    out[0] = sn[0]; out[1] = sm[0]; out[2] = s2[0];
  }
}

// One thread per row: merges its `blocks` partials into (mean, 1 / sqrt(biased variance + eps)).
extern "C" __global__ void finish_stats(const float* part, int rows, int blocks, float eps, float* stats) {
  int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (int b = 0; b < blocks; ++b) {
    const float* q = part + ((long long)row * blocks + b) * 3;
    merge(n, mean, m2, q[0], q[1], q[2]);
  }
  stats[2 * row] = mean;
  stats[2 * row + 1] = 1.f / sqrtf(m2 / n + eps);
}

// y = leaky_relu((a - mean_a) * rstd_a + r), r = 0 (mode 0), b (mode 1) or (b - mean_b) * rstd_b (mode 2).
template <class D>
__device__ void norm_act(const typename D::T* a, const float* sa, const typename D::T* b, const float* sb,
                         typename D::T* y, long long S, float slope, int mode) {
  long long off = (long long)blockIdx.y * S;
  float ma = sa[2 * blockIdx.y], ra = sa[2 * blockIdx.y + 1];
  float mb = 0.f, rb = 1.f;
  if (mode == 2) { mb = sb[2 * blockIdx.y]; rb = sb[2 * blockIdx.y + 1]; }
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < S; i += (long long)gridDim.x * blockDim.x) {
    float v = (D::load(a, off + i) - ma) * ra;
    if (mode != 0) v += (D::load(b, off + i) - mb) * rb;
    D::store(y, off + i, v > 0.f ? v : v * slope);
  }
}

#define LWI_KERNELS(NAME, D)                                                                          \
  extern "C" __global__ void row_stats_##NAME(const D::T* x, long long S, float* part) {             \
    row_stats<D>(x, S, part);                                                                         \
  }                                                                                                   \
  extern "C" __global__ void norm_act_##NAME(const D::T* a, const float* sa, const D::T* b,          \
                                             const float* sb, D::T* y, long long S, float slope,      \
                                             int mode) {                                              \
    norm_act<D>(a, sa, b, sb, y, S, slope, mode);                                                     \
  }
LWI_KERNELS(f32, F32)
LWI_KERNELS(f16, F16)
LWI_KERNELS(bf16, BF16)
)CUDA";

// The few CUDA driver and NVRTC declarations used, by hand: no CUDA headers at build time.
typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st* CUcontext;
typedef struct CUmod_st* CUmodule;
typedef struct CUfunc_st* CUfunction;
typedef struct CUstream_st* CUstream;
typedef int nvrtcResult;
typedef struct _nvrtcProgram* nvrtcProgram;
const int kComputeCapabilityMajor = 75;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
const int kComputeCapabilityMinor = 76;

struct Api {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void**, void**);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram*, const char*, const char*, int, const char* const*,
                                    const char* const*);
  nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram, int, const char* const*);
  nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t*);
  nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram, char*);
  nvrtcResult (*nvrtcGetPTXSize)(nvrtcProgram, size_t*);
  nvrtcResult (*nvrtcGetPTX)(nvrtcProgram, char*);
  nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram*);
};

struct Failure {
  std::string what;
};

void* open_first(std::initializer_list<const char*> names) {
  for (const char* n : names) {
    if (void* h = dlopen(n, RTLD_NOW | RTLD_GLOBAL)) return h;
  }
  return nullptr;
}

template <class F>
void bind(void* lib, const char* name, F& f) {
  f = reinterpret_cast<F>(dlsym(lib, name));
  if (!f) throw Failure{std::string("symbol ") + name + " not found"};
}

// NVRTC: by soname, else where PyTorch's wheels put it beside libtorch (nvidia/cu13/lib), a
// folder libtorch itself finds through its RPATH but a dlopen from lwi does not search.
void* open_nvrtc() {
  if (void* h = open_first({"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"})) return h;
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&at::autocast::clear_cache), &info) || !info.dli_fname) return nullptr;
  std::string dir(info.dli_fname);
  dir = dir.substr(0, dir.rfind('/'));
  for (const char* sub : {"/../../nvidia/cu13/lib/", "/../../nvidia/cuda_nvrtc/lib/"}) {
    // NVRTC loads its builtins library by soname at compile time: load it first from the same folder.
    glob_t found{};
    if (glob((dir + sub + "libnvrtc-builtins.so.*").c_str(), 0, nullptr, &found) == 0) {
      for (size_t i = 0; i < found.gl_pathc; ++i) dlopen(found.gl_pathv[i], RTLD_NOW | RTLD_GLOBAL);
    }
    globfree(&found);
    for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12"}) {
      if (void* h = dlopen((dir + sub + name).c_str(), RTLD_NOW | RTLD_GLOBAL)) return h;
    }
  }
  return nullptr;
}

// Each Api member from the library's symbol of the same name.
#define LWI_BIND(lib, name) bind(lib, #name, api.name)

// Binds NVRTC's functions; throws Failure when it is missing.
void load_nvrtc(Api& api) {
  void* nvrtc = open_nvrtc();
  if (!nvrtc) throw Failure{"NVRTC (libnvrtc.so) not found"};
  LWI_BIND(nvrtc, nvrtcCreateProgram);
  LWI_BIND(nvrtc, nvrtcCompileProgram);
  LWI_BIND(nvrtc, nvrtcGetProgramLogSize);
  LWI_BIND(nvrtc, nvrtcGetProgramLog);
  LWI_BIND(nvrtc, nvrtcGetPTXSize);
  LWI_BIND(nvrtc, nvrtcGetPTX);
  LWI_BIND(nvrtc, nvrtcDestroyProgram);
}

// Binds the CUDA driver's functions; throws Failure when it is missing.
void load_driver(Api& api) {
  void* cuda = open_first({"libcuda.so.1", "libcuda.so"});
  if (!cuda) throw Failure{"the CUDA driver (libcuda.so.1) not found"};
  LWI_BIND(cuda, cuInit);
  LWI_BIND(cuda, cuDeviceGet);
  LWI_BIND(cuda, cuDeviceGetAttribute);
  LWI_BIND(cuda, cuDevicePrimaryCtxRetain);
  LWI_BIND(cuda, cuCtxSetCurrent);
  LWI_BIND(cuda, cuModuleLoadData);
  LWI_BIND(cuda, cuModuleGetFunction);
  LWI_BIND(cuda, cuLaunchKernel);
  LWI_BIND(cuda, cuGetErrorString);
}
#undef LWI_BIND

void check(const Api& api, CUresult r, const char* what) {
  if (r == 0) return;
  const char* text = nullptr;
  if (api.cuGetErrorString) api.cuGetErrorString(r, &text);
  throw Failure{std::string(what) + ": CUDA error " + std::to_string(r) + (text ? std::string(" (") + text + ")" : "")};
}

// The kernels compiled to PTX for compute capability `arch` (e.g. 90).
std::string compile(const Api& api, int arch) {
  nvrtcProgram prog = nullptr;
  if (api.nvrtcCreateProgram(&prog, kSource, "lwi_fused_norm.cu", 0, nullptr, nullptr) != 0)
    throw Failure{"nvrtcCreateProgram failed"};
  std::string flag = "--gpu-architecture=compute_" + std::to_string(arch);
  const char* opts[] = {flag.c_str()};
  nvrtcResult r = api.nvrtcCompileProgram(prog, 1, opts);
  if (r != 0) {
    size_t n = 0;
    api.nvrtcGetProgramLogSize(prog, &n);
    std::string log(n, '\0');
    api.nvrtcGetProgramLog(prog, &log[0]);
    api.nvrtcDestroyProgram(&prog);
    throw Failure{"NVRTC could not compile the fused kernels for compute_" + std::to_string(arch) + ": " + log};
  }
  size_t n = 0;
  api.nvrtcGetPTXSize(prog, &n);
  std::string ptx(n, '\0');
  api.nvrtcGetPTX(prog, &ptx[0]);
  api.nvrtcDestroyProgram(&prog);
  return ptx;
}

struct Kernels {
  CUcontext ctx = nullptr;
  CUfunction finish = nullptr;
  CUfunction stats[3] = {nullptr, nullptr, nullptr};  // f32, f16, bf16
  CUfunction apply[3] = {nullptr, nullptr, nullptr};
};

std::mutex g_mutex;
Api g_api;
bool g_nvrtc = false, g_driver = false;  // which parts of g_api are bound (and the driver initialised)
std::string g_unavailable;  // set once loading failed: the reason, reported on every later call
std::map<int, Kernels> g_kernels;

// Binds and initialises the driver once. Call with g_mutex held.
void ensure_driver() {
  if (g_driver) return;
  load_driver(g_api);
  check(g_api, g_api.cuInit(0), "cuInit");
  g_driver = true;
}

// The driver's handle of CUDA device `index`. Call with g_mutex held.
CUdevice device(int index) {
  ensure_driver();
  CUdevice dev = 0;
  check(g_api, g_api.cuDeviceGet(&dev, index), "cuDeviceGet");
  return dev;
}

// Compute capability of `dev` as major * 10 + minor (e.g. 90). Call with g_mutex held.
int compute_capability(CUdevice dev) {
  int major = 0, minor = 0;
  check(g_api, g_api.cuDeviceGetAttribute(&major, kComputeCapabilityMajor, dev), "compute capability");
  check(g_api, g_api.cuDeviceGetAttribute(&minor, kComputeCapabilityMinor, dev), "compute capability");
  return major * 10 + minor;
}

// The kernels for CUDA device `index`, built on first use. Call with g_mutex held.
const Kernels& kernels(int index) {
  if (!g_unavailable.empty()) throw Failure{g_unavailable};
  auto found = g_kernels.find(index);
  if (found != g_kernels.end()) return found->second;
  try {
    if (!g_nvrtc) {
      load_nvrtc(g_api);
      g_nvrtc = true;
    }
    CUdevice dev = device(index);
    int arch = compute_capability(dev);
    Kernels k;
    check(g_api, g_api.cuDevicePrimaryCtxRetain(&k.ctx, dev), "cuDevicePrimaryCtxRetain");
    check(g_api, g_api.cuCtxSetCurrent(k.ctx), "cuCtxSetCurrent");
    std::string ptx = compile(g_api, arch);
    CUmodule module = nullptr;
    check(g_api, g_api.cuModuleLoadData(&module, ptx.c_str()), "cuModuleLoadData");
    const char* names[3] = {"f32", "f16", "bf16"};
    check(g_api, g_api.cuModuleGetFunction(&k.finish, module, "finish_stats"), "finish_stats");
    for (int i = 0; i < 3; ++i) {
      check(g_api, g_api.cuModuleGetFunction(&k.stats[i], module, (std::string("row_stats_") + names[i]).c_str()), "row_stats");
      check(g_api, g_api.cuModuleGetFunction(&k.apply[i], module, (std::string("norm_act_") + names[i]).c_str()), "norm_act");
    }
    return g_kernels.emplace(index, k).first->second;
  } catch (const Failure& f) {
    g_unavailable = f.what;
    throw;
  }
}

int kind_index(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: throw Failure{std::string("dtype ") + c10::toString(t.scalar_type()) + " has no fused kernel"};
  }
}

const unsigned kThreads = 256;

// Blocks per row: enough to fill the GPU, at most 256 (the partials finish_stats merges).
unsigned blocks_per_row(long long rows, long long S) {
  long long want = (S + kThreads * 8 - 1) / (kThreads * 8);
  long long fill = (4096 + rows - 1) / rows;
  long long b = want < fill ? want : fill;
  return (unsigned)(b < 1 ? 1 : (b > 256 ? 256 : b));
}

// (mean, rstd) per row of `x` ([rows, S] contiguous), as a [rows, 2] float tensor.
at::Tensor stats(const Kernels& k, const at::Tensor& x, long long rows, long long S, float eps) {
  unsigned bx = blocks_per_row(rows, S);
  at::Tensor part = at::empty({rows, (long long)bx, 3}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({rows, 2}, x.options().dtype(at::kFloat));
  const void* xp = x.data_ptr();
  void* pp = part.data_ptr();
  void* args1[] = {&xp, &S, &pp};
  check(g_api, g_api.cuLaunchKernel(k.stats[kind_index(x)], bx, (unsigned)rows, 1, kThreads, 1, 1, 0, nullptr, args1, nullptr),
        "launching row_stats");
  int r = (int)rows, b = (int)bx;
  void* op = out.data_ptr();
  void* args2[] = {&pp, &r, &b, &eps, &op};
  check(g_api, g_api.cuLaunchKernel(k.finish, (unsigned)((rows + 127) / 128), 1, 1, 128, 1, 1, 0, nullptr, args2, nullptr),
        "launching finish_stats");
  return out;
}

void write_error(char* err, size_t len, const std::string& what) {
  if (err && len > 0) std::snprintf(err, len, "%s", what.c_str());
}

// Runs `body`: 0, or -1 with what it threw written to `err`. Nothing crosses the C boundary.
template <class F>
int guarded(char* err, size_t len, F&& body) {
  try {
    body();
    return 0;
  } catch (const Failure& f) {
    write_error(err, len, f.what);
  } catch (const std::exception& e) {
    write_error(err, len, e.what());
  }
  return -1;
}

}  // namespace

extern "C" {

// Compiles the fused kernels to PTX for `arch` without touching a GPU (NVRTC only): 0, or -1 with
// the reason in `err`. For tests on machines without a GPU.
int lwi_fused_norm_compile_check(int arch, char* err, size_t len) {
  return guarded(err, len, [&] {
    Api api{};
    load_nvrtc(api);
    compile(api, arch);
  });
}

// Compute capability of CUDA device `index` as major * 10 + minor (e.g. 90), or -1 when the driver
// or the device is not there.
int lwi_cuda_compute_capability(int index) {
  std::lock_guard<std::mutex> lock(g_mutex);
  int cc = -1;
  guarded(nullptr, 0, [&] { cc = compute_capability(device(index)); });
  return cc;
}

// y = leaky_relu(instance_norm(a) + r) with r = 0 (b NULL), b (mode 1) or instance_norm(b) (mode 2);
// instance norm without affine, biased variance, `eps`; leaky slope `slope`. `a` and `b`:
// contiguous CUDA [N, C, ...] of one dtype (float32, float16, bfloat16) and shape. On success
// returns 0 and a new tensor in *out; otherwise -1 with the reason in `err`, and *out untouched.
int lwi_fused_norm_act(const at::Tensor* a, const at::Tensor* b, int mode, float eps, float slope, at::Tensor** out,
                       char* err, size_t len) {
  return guarded(err, len, [&] {
    if (!a || !out || (mode != 0 && !b) || mode < 0 || mode > 2) throw Failure{"bad arguments"};
    if (!a->is_cuda() || !a->is_contiguous() || a->dim() < 3 || a->numel() == 0)
      throw Failure{"input must be a non-empty contiguous CUDA tensor [N, C, ...]"};
    if (mode != 0 && (b->sizes() != a->sizes() || b->scalar_type() != a->scalar_type() || !b->is_contiguous() ||
                      b->device() != a->device()))
      throw Failure{"the residual must match the input's shape, dtype, device and layout"};
    long long rows = a->size(0) * a->size(1);
    long long S = a->numel() / rows;
    if (rows > 65535) throw Failure{"more than 65535 (batch, channel) rows"};
    std::lock_guard<std::mutex> lock(g_mutex);
    const Kernels& k = kernels(a->device().index());
    check(g_api, g_api.cuCtxSetCurrent(k.ctx), "cuCtxSetCurrent");
    at::Tensor sa = stats(k, *a, rows, S, eps);
    at::Tensor sb = mode == 2 ? stats(k, *b, rows, S, eps) : sa;
    at::Tensor y = at::empty_like(*a, at::MemoryFormat::Contiguous);
    const void* ap = a->data_ptr();
    const void* bp = mode != 0 ? b->data_ptr() : ap;
    const void* sap = sa.data_ptr();
    const void* sbp = sb.data_ptr();
    void* yp = y.data_ptr();
    void* args[] = {&ap, &sap, &bp, &sbp, &yp, &S, &slope, &mode};
    unsigned bx = blocks_per_row(rows, S);
    check(g_api, g_api.cuLaunchKernel(k.apply[kind_index(*a)], bx, (unsigned)rows, 1, kThreads, 1, 1, 0, nullptr, args, nullptr),
          "launching norm_act");
    *out = new at::Tensor(std::move(y));
  });
}
}
