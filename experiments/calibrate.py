"""Calibrates the performance model on this machine and prints the resulting HardwareSpec.

    python -m experiments.calibrate                 # small-mixtral, cached per machine
    python -m experiments.calibrate --nouse_cache   # measure again
"""

from __future__ import annotations

import dataclasses
import time

from absl import app, flags

import moelens_jax as mj
from experiments import common
from moelens_jax import perf

_MODEL = flags.DEFINE_string("model", mj.config.DEFAULT_PRESET, "Preset name or checkpoint.")
_USE_CACHE = flags.DEFINE_bool("use_cache", True, "Reuse a cached calibration of this machine.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for random preset weights.")


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    model = mj.load_model(_MODEL.value, seed=_SEED.value)
    t0 = time.perf_counter()
    cal = perf.calibrate(model, use_cache=_USE_CACHE.value)
    took = time.perf_counter() - t0
    hw, costs = dataclasses.asdict(cal.hardware), dataclasses.asdict(cal.costs)
    for title, d in (("rates (HardwareSpec)", hw), ("cost terms (EngineCosts)", costs)):
        print(common.table([(k, f"{v:.4g}" if isinstance(v, float) else v)
                            for k, v in d.items()], f"== calibration: {title} =="))
    print(f"speed probe {cal.probe_s * 1e3:.1f} ms; calibration took {took:.1f} s")
    common.print_json({"hardware": hw, "costs": costs, "probe_s": cal.probe_s,
                       "calibrate_s": took, "flags": settings,
                       "machine": common.machine_fingerprint()})


if __name__ == "__main__":
    app.run(main)
