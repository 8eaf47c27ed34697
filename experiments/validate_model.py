"""Validates Stage 2 against the real engine on this machine.

For each model preset: calibrate (in this run, not cached), then for each configuration of the
held-out grid (`model_validation.GRID`, written down before tuning, disjoint from the
calibration workloads) run the engine on identical requests once untimed (it compiles every
shape) and then timed: at least 3 runs and until 6 s were timed (at most 30), the median, with
the spread of the repeats ((max - min) / median) reported so noise is visible; and predict it
with Stage 2 from that calibration and the same `EngineConfig`. Accuracy per configuration =
1 - |predicted - measured| / measured on generated tokens/s. On a shared machine the speed
drifts between calibration and measurement: a speed probe (`perf.speed_probe`) recorded at
calibration and run again right before and after each configuration's timed runs gives the
drift, and JSON `mean_accuracy_drift_corrected` / `min_accuracy_drift_corrected` judge the
predictions scaled by it. The uncorrected `mean_accuracy` / `min_accuracy` are the headline.

    python -m experiments.validate_model --plot_out validate.png
    python -m experiments.validate_model --quick          # 4 configs per preset (CI-sized)
"""

from __future__ import annotations

from absl import app, flags

from experiments import common
from experiments.model_validation import GRID, QUICK_GRID, validate

_PRESETS = flags.DEFINE_list("presets", ["small-mixtral", "tiny-qwen3-moe"], "Model presets.")
_PLOT_OUT = flags.DEFINE_string("plot_out", None, "Write a predicted-vs-measured PNG here.")
_QUICK = flags.DEFINE_bool("quick", False, "The 4-configuration grid (QUICK_GRID) per preset.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and workloads.")


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    result = validate(_PRESETS.value, QUICK_GRID if _QUICK.value else GRID, _SEED.value,
                      _PLOT_OUT.value)
    common.print_json({**result, "flags": settings, "machine": common.machine_fingerprint()})


if __name__ == "__main__":
    app.run(main)
