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

ffi::Error ExpertFfnFfiImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> group_sizes,
                            ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                            ffi::ResultBuffer<ffi::F32> y, int64_t isa) {
  const auto xd = x.dimensions(), gd = w_gate.dimensions(), ud = w_up.dimensions(),
             dd = w_down.dimensions(), yd = y->dimensions();
  if (xd.size() != 2) return Invalid("x must be [m, h]");
  if (gd.size() != 3 || ud.size() != 3 || dd.size() != 3) {
    return Invalid("weights must be w_gate/w_up [E, h, f] and w_down [E, f, h_out]");
  }
  const int64_t m = xd[0], h = xd[1], E = gd[0], f = gd[2], ho = dd[2];
  if (gd[1] != h || ud[0] != E || ud[1] != h || ud[2] != f || dd[0] != E || dd[1] != f) {
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
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::BF16) {
    return Invalid("weights must be float32 or bfloat16");
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
  a.dtype = dt == ffi::DataType::BF16 ? WeightDtype::kBf16 : WeightDtype::kF32;
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa"));
