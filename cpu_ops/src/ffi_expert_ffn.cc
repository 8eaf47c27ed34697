// XLA FFI handler of the grouped expert FFN on the CPU backend (zero-copy: XLA's buffers are
// read and written in place). Shapes, dtypes and group sizes are checked here and in
// ExpertFfn; bad input returns an FFI error (a Python exception at the call), never a crash.
#include <string>

#include "expert_ffn.h"
#include "thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace moelens {

namespace {

ffi::Error Invalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "moelens_expert_ffn: " + msg);
}

// Scales of a quantised matrix [E, k, out] (int4 codes [E, k / 2, out]): [E, out] for int8,
// [E, k / group, out] for int4. Sets *group (int4: rows per scale row; int8: k).
ffi::Error CheckScales(const ffi::AnyBuffer& s, WeightDtype fmt, int64_t E, int64_t k,
                       int64_t out, const char* name, int64_t* group) {
  const auto d = s.dimensions();
  if (s.element_type() != ffi::DataType::F32) return Invalid(std::string(name) + " must be float32");
  if (fmt == WeightDtype::kInt8) {
    if (d.size() != 2 || d[0] != E || d[1] != out) {
      return Invalid(std::string(name) + " must be [E, out] for int8 weights");
    }
    *group = k;
    return ffi::Error::Success();
  }
  if (d.size() != 3 || d[0] != E || d[2] != out || d[1] <= 0 || k % d[1] != 0) {
    return Invalid(std::string(name) + " must be [E, k / group, out] for int4 weights, with "
                   "group dividing k");
  }
  *group = k / d[1];
  return ffi::Error::Success();
}

ffi::Error ExpertFfnFfiImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> group_sizes,
                            ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                            ffi::AnyBuffer s_gate, ffi::AnyBuffer s_up, ffi::AnyBuffer s_down,
                            ffi::ResultBuffer<ffi::F32> y, int64_t isa, int64_t fmt,
                            int64_t round_bf16) {
  const auto xd = x.dimensions(), gd = w_gate.dimensions(), ud = w_up.dimensions(),
             dd = w_down.dimensions(), yd = y->dimensions();
  if (xd.size() != 2) return Invalid("x must be [m, h]");
  if (gd.size() != 3 || ud.size() != 3 || dd.size() != 3) {
    return Invalid("weights must be w_gate/w_up [E, h, f] and w_down [E, f, h_out]");
  }
  if (fmt < 0 || fmt > 3) return Invalid("fmt must be 0 (f32), 1 (bf16), 2 (int8) or 3 (int4)");
  const WeightDtype wd = WeightDtype(fmt);
  const int64_t packing = wd == WeightDtype::kInt4 ? 2 : 1;  // codes per stored row element
  const int64_t m = xd[0], h = xd[1], E = gd[0], f = gd[2], ho = dd[2];
  if (gd[1] * packing != h || ud[0] != E || ud[1] != gd[1] || ud[2] != f || dd[0] != E ||
      dd[1] * packing != f) {
    return Invalid("weight shapes disagree with each other or with x");
  }
  if (group_sizes.dimensions().size() != 1 || group_sizes.dimensions()[0] != E) {
    return Invalid("group_sizes must be [E]");
  }
  if (yd.size() != 2 || yd[0] != m || yd[1] != ho) return Invalid("y must be [m, h_out]");
  const auto dt = w_gate.element_type();
  if (w_up.element_type() != dt || w_down.element_type() != dt) {
    return Invalid("w_gate, w_up and w_down must share one dtype");
  }
  const ffi::DataType want = wd == WeightDtype::kF32    ? ffi::DataType::F32
                             : wd == WeightDtype::kBf16 ? ffi::DataType::BF16
                                                        : ffi::DataType::S8;
  if (dt != want) {
    return Invalid("weights must be float32 (fmt 0), bfloat16 (1) or int8 codes (2, 3)");
  }
  const bool quantised = wd == WeightDtype::kInt8 || wd == WeightDtype::kInt4;
  int64_t gate_group = 0, up_group = 0, down_group = 0;
  if (quantised) {
    for (auto err : {CheckScales(s_gate, wd, E, h, f, "s_gate", &gate_group),
                     CheckScales(s_up, wd, E, h, f, "s_up", &up_group),
                     CheckScales(s_down, wd, E, f, ho, "s_down", &down_group)}) {
      if (err.failure()) return err;
    }
    if (up_group != gate_group) return Invalid("s_gate and s_up must have one group size");
  }
  if (isa < 0 || isa > int(BestSupportedIsa(DetectCpuFeatures()))) {
    return Invalid("ISA level " + std::to_string(isa) + " is not supported by this CPU");
  }
  ExpertFfnArgs a;
  a.x = x.typed_data();
  a.group_sizes = group_sizes.typed_data();
  a.w_gate = w_gate.untyped_data();
  a.w_up = w_up.untyped_data();
  a.w_down = w_down.untyped_data();
  a.dtype = wd;
  if (quantised) {
    a.s_gate = reinterpret_cast<const float*>(s_gate.untyped_data());
    a.s_up = reinterpret_cast<const float*>(s_up.untyped_data());
    a.s_down = reinterpret_cast<const float*>(s_down.untyped_data());
    a.gate_group = gate_group;
    a.down_group = down_group;
    a.round_bf16 = round_bf16 != 0;
  }
  a.m = m;
  a.h = h;
  a.f = f;
  a.ho = ho;
  a.num_experts = E;
  a.y = y->typed_data();
  try {
    const std::shared_ptr<ThreadPool> pool = SharedPool();  // held until the call returns
    ExpertFfn(a, Isa(isa), *pool);
  } catch (const std::exception& e) {
    return Invalid(e.what());
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace moelens

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoelensExpertFfnFfi, moelens::ExpertFfnFfiImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("fmt")
                                  .Attr<int64_t>("round_bf16"));
