// Non-x86 builds: the x86 SIMD kernels do not exist; the dispatcher falls back to portable.
#include "attention.h"

namespace moelens {
ChunkFn GetChunkFnAvx2(KvDtype, int, int) { return nullptr; }
ChunkFn GetChunkFnAvx512(KvDtype, int, int) { return nullptr; }
}  // namespace moelens
