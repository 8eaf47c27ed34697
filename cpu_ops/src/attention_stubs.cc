// Non-x86 builds: the x86 SIMD kernels do not exist; the dispatcher falls back to portable.
#include "attention.h"
#include "expert_impl.h"

namespace moelens {
PageFn GetPageFnAvx2(KvDtype, int, int) { return nullptr; }
PageFn GetPageFnAvx512(KvDtype, int, int) { return nullptr; }
SiluMulFn GetSiluMulAvx2() { return nullptr; }
SiluMulFn GetSiluMulAvx512() { return nullptr; }
SmallGemmFn GetSmallGemmAvx2() { return nullptr; }
SmallGemmFn GetSmallGemmAvx512() { return nullptr; }
PackedGemmFn GetPackedGemmAvx2() { return nullptr; }
PackedGemmFn GetPackedGemmAvx512() { return nullptr; }
}  // namespace moelens
