// XLA FFI handlers for decode attention and packed-prefill attention on the CPU backend:
// zero-copy access to the operands, called from inside a jitted computation without leaving
// XLA (~0.2 us overhead in jax 0.10 vs ~28 us + ~20 us per argument for pure_callback). The
// decode store is named by an integer handle (attribute);
// an unknown/destroyed handle, bad shapes, bad ids or a bad scale return an FFI error, never a
// crash. Attributes: `scale` is used unless `default_scale` is true (then 1/sqrt(head_dim)); a
// used scale must be finite and > 0.
#include <memory>
#include <string>

#include "attention.h"
#include "kv_store.h"
#include "thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace moelens {
namespace {

ffi::Error Invalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "moelens_decode_attention: " + msg);
}

ffi::Error DecodeAttentionFfiImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> seq_ids,
                                  ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out,
                                  int64_t store_id, float scale, bool default_scale,
                                  int64_t chunk_tokens, int64_t isa) {
  auto qd = q.dimensions();
  if (qd.size() != 3) return Invalid("q must be [n, heads, head_dim]");
  if (seq_ids.dimensions().size() != 1 || seq_ids.dimensions()[0] != qd[0]) {
    return Invalid("seq_ids must be [n]");
  }
  if (layer.element_count() != 1) return Invalid("layer must be a scalar");
  auto od = out->dimensions();
  if (od.size() != 3 || od[0] != qd[0] || od[1] != qd[1] || od[2] != qd[2]) {
    return Invalid("out must have q's shape [n, heads, head_dim]");
  }
  if (isa < 0 || isa > int(BestSupportedIsa(DetectCpuFeatures()))) {
    return Invalid("ISA level " + std::to_string(isa) + " is not supported by this CPU");
  }
  try {
    StoreRegistry::Handle h = StoreRegistry::Get(store_id);
    const KvStore& store = *h.store;
    if (qd[2] != store.geometry().head_dim) return Invalid("q head_dim != store head_dim");
    const int64_t n = qd[0];
    std::vector<int64_t> ids(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = seq_ids.typed_data()[i];
    AttentionOptions opt;
    opt.isa = Isa(isa);
    if (!default_scale) opt.scale = scale;
    opt.chunk_tokens = chunk_tokens;
    const std::shared_ptr<ThreadPool> pool = SharedPool();  // held until the call returns
    DecodeAttention(store, q.typed_data(), ids.data(), n, int(qd[1]), layer.typed_data()[0], opt,
                    *pool, out->typed_data());
  } catch (const std::exception& e) {
    return Invalid(e.what());
  }
  return ffi::Error::Success();
}

ffi::Error PrefillInvalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "moelens_prefill_attention: " + msg);
}

ffi::Error PrefillAttentionFfiImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                                   ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> out,
                                   float scale, bool default_scale, int64_t isa) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             od = out->dimensions();
  if (qd.size() != 3) return PrefillInvalid("q must be [n, heads, head_dim]");
  if (kd.size() != 3 || kd[0] != qd[0] || kd[2] != qd[2] || vd.size() != 3 || vd[0] != kd[0] ||
      vd[1] != kd[1] || vd[2] != kd[2]) {
    return PrefillInvalid("k and v must be [n, kv_heads, head_dim] with q's n and head_dim");
  }
  if (seg.dimensions().size() != 1 || seg.dimensions()[0] != qd[0] ||
      pos.dimensions().size() != 1 || pos.dimensions()[0] != qd[0]) {
    return PrefillInvalid("seg and pos must be [n]");
  }
  if (od.size() != 3 || od[0] != qd[0] || od[1] != qd[1] || od[2] != qd[2]) {
    return PrefillInvalid("out must have q's shape [n, heads, head_dim]");
  }
  if (isa < 0 || isa > int(BestSupportedIsa(DetectCpuFeatures()))) {
    return PrefillInvalid("ISA level " + std::to_string(isa) + " is not supported by this CPU");
  }
  try {
    AttentionOptions opt;
    opt.isa = Isa(isa);
    if (!default_scale) opt.scale = scale;
    const std::shared_ptr<ThreadPool> pool = SharedPool();  // held until the call returns
    PrefillAttention(q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(),
                     pos.typed_data(), qd[0], int(qd[1]), int(kd[1]), int(qd[2]), opt, *pool,
                     out->typed_data());
  } catch (const std::exception& e) {
    return PrefillInvalid(e.what());
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace moelens

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoelensPrefillAttentionFfi, moelens::PrefillAttentionFfiImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("default_scale")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoelensDecodeAttentionFfi, moelens::DecodeAttentionFfiImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("store_id")
                                  .Attr<float>("scale")
                                  .Attr<bool>("default_scale")
                                  .Attr<int64_t>("chunk_tokens")
                                  .Attr<int64_t>("isa"));
