// Python bindings of the host-side kernels (module moelens_jax._cpu_ops).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "cpu_features.h"

namespace nb = nanobind;

namespace {

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
  for (moelens::Isa isa : moelens::SupportedIsas(moelens::DetectCpuFeatures())) {
    out.emplace_back(moelens::IsaName(isa));
  }
  return out;
}

}  // namespace

NB_MODULE(_cpu_ops, m) {
  m.doc() = "moelens-jax host-side C++ kernels";
  m.def("cpu_features", &CpuFeaturesDict, "Raw CPU feature flags seen at run time.");
  m.def("supported_isas", &SupportedIsaNames,
        "ISA levels this machine can run, lowest first ('portable', 'avx2', 'avx512', "
        "'avx512_bf16').");
}
