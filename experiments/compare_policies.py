"""MoE-Lens vs MoE-Lightning policies on this machine: same engine, kernels, model, requests.

The paper's regime is an accelerator starved by its weight link (A40: 150 TFLOP/s over 19.5
GB/s PCIe = 7.7k FLOP per streamed byte) with a KV cache too small to saturate it. Here the
engine's link-bandwidth cap puts this CPU in that regime: the cap is the calibrated GEMM rate
divided by `--flop_per_byte` (default 128, 1/60 of the A40's ratio: the A40's own ratio on
this CPU would stream ~6 MB/s and need ~30 s per pass of small-mixtral;
`--flop_per_byte 7692` does it). The KV cache defaults to the smaller of half what MoE-Lens
needs to saturate that link (Stage 1) and 1/6 of the workload's tokens (so MoE-Lightning needs
~6 static batches), so runs are capacity-bound as in the paper. Workload lengths are scaled
down (printed) to fit the run into ~15 minutes; the generation length sets the number of
passes, so long-generation workloads are shortened most. With bf16 weights, batch
composition changes rounding, so greedy tokens may differ between the policies
(`identical_requests`); the float32 tests check they are identical.

    python -m experiments.compare_policies
    python -m experiments.compare_policies --workloads mtbench,rag --num_requests 16
"""

from __future__ import annotations

from absl import app, flags

import moelens_jax as mj
from experiments import common
from experiments.policy_comparison import SCALES, compare

_MODEL = flags.DEFINE_string("model", mj.config.DEFAULT_PRESET, "Preset name or checkpoint.")
_WORKLOADS = flags.DEFINE_list("workloads", list(SCALES), "Workloads (see workloads.py).")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 48, "Requests per workload.")
_FLOP_PER_BYTE = flags.DEFINE_float("flop_per_byte", 128.0, "Target GEMM FLOP/s per link B/s.")
_KV_TOKENS = flags.DEFINE_integer("kv_tokens", None, "KV capacity in tokens (default: half "
                                  "of MoE-Lens's saturation need, per workload).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Weight dtype (default: the preset's / checkpoint's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and workloads.")


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    model = mj.load_model(_MODEL.value, dtype=_DTYPE.value, seed=_SEED.value)
    result = compare(model, _WORKLOADS.value, _NUM_REQUESTS.value, _FLOP_PER_BYTE.value,
                     _KV_TOKENS.value, _SEED.value)
    common.print_json({**result, "flags": settings, "machine": common.machine_fingerprint()})


if __name__ == "__main__":
    app.run(main)
