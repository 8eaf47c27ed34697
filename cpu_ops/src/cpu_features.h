// Runtime CPU feature detection: which of the compiled ISA paths this machine can run.
#pragma once

#include <string>
#include <vector>

namespace moelens {

// ISA levels in increasing order of capability. A kernel compiled for level L runs on any
// machine whose best level is >= L.
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512bf16 = false;
};

CpuFeatures DetectCpuFeatures();

// Best ISA level the machine supports (independent of any override).
Isa BestSupportedIsa(const CpuFeatures& f);

// Every level up to and including BestSupportedIsa, lowest first.
std::vector<Isa> SupportedIsas(const CpuFeatures& f);

const char* IsaName(Isa isa);
// Returns false if `name` is not a known ISA name.
bool ParseIsa(const std::string& name, Isa* out);

}  // namespace moelens
