// Python bindings of the host-side kernels (module moelens_jax._cpu_ops).
//
// This is the adapter layer: every array is checked here (dtype, rank, shape, C-contiguity)
// and every index in C++ (KvStore / DecodeAttention), so bad input raises a Python exception
// (ValueError / IndexError / KvCapacityError -> RuntimeError subclass) and never touches memory
// out of bounds. The GIL is released while appending and attending.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <optional>
#include <string>

#include "attention.h"
#include "blas.h"
#include "cpu_features.h"
#include "kv_store.h"
#include "membench.h"
#include "thread_pool.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;
using moelens::Isa;
using moelens::KvDtype;
using moelens::KvStore;

namespace {

using InArray = nb::ndarray<nb::ro, nb::device::cpu>;  // read-only inputs (jax hands these)
using OutArray = nb::ndarray<nb::device::cpu>;         // writable outputs

// The kernels' thread pool is moelens::SharedPool() (thread_pool.h): every call holds the
// shared_ptr until it returns, so set_num_threads never frees a pool a running call uses.
void SetNumThreads(int n) { moelens::SetSharedPoolThreads(n); }

template <class A>
std::string ShapeStr(const A& a) {
  std::string s = "[";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

// Checks dtype, rank, C-contiguity and (where >= 0) each dimension.
template <class A>
void CheckArray(const A& a, const char* name, nb::dlpack::dtype dt, const char* dt_name,
                std::vector<int64_t> shape) {
  if (a.dtype() != dt) {
    throw nb::value_error((std::string(name) + " must have dtype " + dt_name).c_str());
  }
  if (a.ndim() != shape.size()) {
    throw nb::value_error((std::string(name) + " must have rank " + std::to_string(shape.size()) +
                           ", got shape " + ShapeStr(a)).c_str());
  }
  int64_t expect = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (shape[i] >= 0 && int64_t(a.shape(i)) != shape[i]) {
      throw nb::value_error((std::string(name) + " has shape " + ShapeStr(a) + ", dimension " +
                             std::to_string(i) + " must be " + std::to_string(shape[i])).c_str());
    }
    if (a.size() > 0 && a.shape(i) > 1 && a.stride(i) != expect) {
      throw nb::value_error((std::string(name) + " must be C-contiguous").c_str());
    }
    expect *= int64_t(a.shape(i));
  }
}

KvDtype ParseDtype(const std::string& name) {
  KvDtype d;
  if (!moelens::ParseKvDtype(name, &d)) {
    throw nb::value_error(("unsupported KV dtype '" + name +
                           "' (supported: bfloat16, float16, float32)").c_str());
  }
  return d;
}

Isa ParseRunnableIsa(const std::string& name) {
  Isa isa;
  if (!moelens::ParseIsa(name, &isa)) throw nb::value_error(("unknown ISA '" + name + "'").c_str());
  if (int(isa) > int(moelens::BestSupportedIsa(moelens::DetectCpuFeatures()))) {
    throw nb::value_error(("ISA '" + name + "' is not supported by this CPU").c_str());
  }
  return isa;
}

void InitStore(KvStore* self, int num_layers, int num_kv_heads, int head_dim, int page_size,
               int64_t num_pages, const std::string& dtype) {
  moelens::KvGeometry g{num_layers, num_kv_heads, head_dim, page_size, ParseDtype(dtype)};
  new (self) KvStore(g, num_pages);
}

void CheckIds(const InArray& ids, const char* name) {
  CheckArray(ids, name, nb::dtype<int64_t>(), "int64", {-1});
}

void Append(KvStore& s, InArray seq_ids, InArray counts, int layer, InArray k, InArray v) {
  CheckIds(seq_ids, "seq_ids");
  const int64_t n = int64_t(seq_ids.shape(0));
  CheckArray(counts, "counts", nb::dtype<int32_t>(), "int32", {n});
  const auto& g = s.geometry();
  KvDtype src;
  if (k.dtype() == nb::dtype<float>()) {
    src = KvDtype::kF32;
  } else if (k.dtype() == nb::dtype<uint16_t>() && g.dtype != KvDtype::kF32) {
    src = g.dtype;  // raw 16-bit bits of the storage dtype
  } else {
    throw nb::value_error("k must be float32, or uint16 holding the raw bits of the store "
                          "dtype (bfloat16/float16)");
  }
  const auto dt = k.dtype();
  const char* dt_name = src == KvDtype::kF32 ? "float32" : "uint16";
  CheckArray(k, "k", dt, dt_name, {-1, g.num_kv_heads, g.head_dim});
  CheckArray(v, "v", dt, dt_name, {int64_t(k.shape(0)), g.num_kv_heads, g.head_dim});
  const auto* ids = static_cast<const int64_t*>(seq_ids.data());
  const auto* cnt = static_cast<const int32_t*>(counts.data());
  nb::gil_scoped_release release;
  s.Append(ids, cnt, n, layer, k.data(), v.data(), src, int64_t(k.shape(0)));
}

int64_t PagesNeeded(const KvStore& s, InArray seq_ids, InArray counts) {
  CheckIds(seq_ids, "seq_ids");
  CheckArray(counts, "counts", nb::dtype<int32_t>(), "int32", {int64_t(seq_ids.shape(0))});
  return s.PagesNeeded(static_cast<const int64_t*>(seq_ids.data()),
                       static_cast<const int32_t*>(counts.data()), int64_t(seq_ids.shape(0)));
}

nb::ndarray<nb::numpy, float> NewF32(std::vector<size_t> shape, float** data) {
  size_t n = 1;
  for (size_t x : shape) n *= x;
  float* buf = new float[n > 0 ? n : 1];
  *data = buf;
  nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<float*>(p); });
  return nb::ndarray<nb::numpy, float>(buf, shape.size(), shape.data(), owner);
}

nb::tuple Read(const KvStore& s, int64_t seq_id, int layer) {
  const auto& g = s.geometry();
  const int64_t len = s.Length(seq_id, layer);
  std::vector<size_t> shape{size_t(len), size_t(g.num_kv_heads), size_t(g.head_dim)};
  float *kd, *vd;
  auto k = NewF32(shape, &kd);
  auto v = NewF32(shape, &vd);
  s.Read(seq_id, layer, kd, vd);
  return nb::make_tuple(k, v);
}

// scale: None means 1/sqrt(head_dim); anything but a finite positive number is a ValueError
// (std::invalid_argument from DecodeAttention).
void DecodeAttentionInto(const KvStore& s, InArray q, InArray seq_ids, int layer,
                         std::optional<float> scale, const std::string& isa,
                         int64_t chunk_tokens, OutArray out) {
  CheckIds(seq_ids, "seq_ids");
  const int64_t n = int64_t(seq_ids.shape(0));
  const auto& g = s.geometry();
  CheckArray(q, "q", nb::dtype<float>(), "float32", {n, -1, g.head_dim});
  CheckArray(out, "out", nb::dtype<float>(), "float32",
             {n, int64_t(q.shape(1)), g.head_dim});
  moelens::AttentionOptions opt;
  opt.isa = ParseRunnableIsa(isa);
  opt.scale = scale;
  opt.chunk_tokens = chunk_tokens;
  const auto* ids = static_cast<const int64_t*>(seq_ids.data());
  const auto* qd = static_cast<const float*>(q.data());
  auto* od = static_cast<float*>(out.data());
  const int nq = int(q.shape(1));
  const std::shared_ptr<moelens::ThreadPool> pool = moelens::SharedPool();
  nb::gil_scoped_release release;
  moelens::DecodeAttention(s, qd, ids, n, nq, layer, opt, *pool, od);
}

uint64_t StreamReadPy(InArray buf) {
  CheckArray(buf, "buf", nb::dtype<uint8_t>(), "uint8", {-1});
  const auto* p = static_cast<const uint8_t*>(buf.data());
  const int64_t n = int64_t(buf.shape(0));
  const std::shared_ptr<moelens::ThreadPool> pool = moelens::SharedPool();
  nb::gil_scoped_release release;
  return moelens::StreamRead(p, n, *pool);
}

nb::dict CpuFeaturesDict() {
  const moelens::CpuFeatures f = moelens::DetectCpuFeatures();
  nb::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512bf16"] = f.avx512bf16;
  return d;
}

std::vector<std::string> SupportedIsaNames() {
  std::vector<std::string> out;
  for (Isa isa : moelens::SupportedIsas(moelens::DetectCpuFeatures())) {
    out.emplace_back(moelens::IsaName(isa));
  }
  return out;
}

}  // namespace

extern "C" XLA_FFI_Error* MoelensDecodeAttentionFfi(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* MoelensExpertFfnFfi(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* MoelensPrefillAttentionFfi(XLA_FFI_CallFrame* call_frame);

NB_MODULE(_cpu_ops, m) {
  m.doc() = "moelens-jax host-side C++ kernels: paged KV store and decode attention";
  nb::exception<moelens::KvCapacityError>(m, "KvCapacityError", PyExc_RuntimeError);

  m.def("cpu_features", &CpuFeaturesDict, "Raw CPU feature flags seen at run time.");
  m.def("supported_isas", &SupportedIsaNames,
        "ISA levels this machine can run, lowest first ('portable', 'avx2', 'avx512', "
        "'avx512_bf16').");
  m.def("effective_isa", [](const std::string& isa, const std::string& dtype, int head_dim) {
          return std::string(moelens::IsaName(
              moelens::EffectiveIsa(ParseRunnableIsa(isa), ParseDtype(dtype), head_dim)));
        }, nb::arg("isa"), nb::arg("dtype"), nb::arg("head_dim"),
        "The kernel level that serves this dtype/head_dim when `isa` is requested.");
  m.def("set_num_threads", &SetNumThreads, nb::arg("n"),
        "Replaces the kernels' shared thread pool with one of n threads (caller included); "
        "calls already running finish on the old pool.");
  m.def("num_threads", [] { return moelens::SharedPool()->num_threads(); });
  m.def("decode_attention_ffi_handler", [] {
          return nb::capsule(reinterpret_cast<void*>(&MoelensDecodeAttentionFfi));
        }, "PyCapsule of the XLA FFI handler (register for platform 'cpu').");
  m.def("expert_ffn_ffi_handler", [] {
          return nb::capsule(reinterpret_cast<void*>(&MoelensExpertFfnFfi));
        }, "PyCapsule of the grouped expert FFN's XLA FFI handler (platform 'cpu').");
  m.def("prefill_attention_ffi_handler", [] {
          return nb::capsule(reinterpret_cast<void*>(&MoelensPrefillAttentionFfi));
        }, "PyCapsule of the packed-prefill causal attention's XLA FFI handler (platform 'cpu').");
  m.def("load_blas", &moelens::LoadBlas, nb::arg("path"),
        "Opens the OpenBLAS shared library (scipy-openblas32) the expert FFN calls.");
  m.def("blas_info", &moelens::BlasInfo, "The loaded BLAS library's build configuration.");
  m.def("stream_read", &StreamReadPy, nb::arg("buf"),
        "Sums a uint8 buffer as 64-bit words on the attention thread pool (bandwidth probe).");

  nb::class_<KvStore>(m, "KvStore")
      .def("__init__", &InitStore, nb::arg("num_layers"), nb::arg("num_kv_heads"),
           nb::arg("head_dim"), nb::arg("page_size"), nb::arg("num_pages"), nb::arg("dtype"))
      .def_prop_ro("num_layers", [](const KvStore& s) { return s.geometry().num_layers; })
      .def_prop_ro("num_kv_heads", [](const KvStore& s) { return s.geometry().num_kv_heads; })
      .def_prop_ro("head_dim", [](const KvStore& s) { return s.geometry().head_dim; })
      .def_prop_ro("page_size", [](const KvStore& s) { return s.geometry().page_size; })
      .def_prop_ro("page_bytes", [](const KvStore& s) { return s.geometry().page_bytes(); })
      .def_prop_ro("dtype",
                   [](const KvStore& s) { return std::string(KvDtypeName(s.geometry().dtype)); })
      .def_prop_ro("num_pages", &KvStore::num_pages)
      .def_prop_ro("handle", &KvStore::handle)
      .def("free_pages", &KvStore::free_pages)
      .def("num_sequences", &KvStore::num_sequences)
      .def("add_sequence", &KvStore::AddSequence, nb::arg("seq_id"))
      .def("free_sequence", &KvStore::FreeSequence, nb::arg("seq_id"))
      .def("has_sequence", &KvStore::HasSequence, nb::arg("seq_id"))
      .def("length", &KvStore::Length, nb::arg("seq_id"), nb::arg("layer"))
      .def("page_table", &KvStore::PageTable, nb::arg("seq_id"))
      .def("pages_needed", &PagesNeeded, nb::arg("seq_ids"), nb::arg("counts"))
      .def("append", &Append, nb::arg("seq_ids"), nb::arg("counts"), nb::arg("layer"),
           nb::arg("k"), nb::arg("v"))
      .def("read", &Read, nb::arg("seq_id"), nb::arg("layer"))
      .def("decode_attention_into", &DecodeAttentionInto, nb::arg("q"), nb::arg("seq_ids"),
           nb::arg("layer"), nb::arg("scale").none(), nb::arg("isa"), nb::arg("chunk_tokens"),
           nb::arg("out"));
}
