"""The compiled extension: CPU feature detection and ISA selection."""

from __future__ import annotations

import pytest

from moelens_jax import ops


def test_cpu_info_reports_a_supported_isa():
    info = ops.cpu_info()
    assert info["supported_isas"][0] == "portable"
    assert info["isa"] in info["supported_isas"]
    assert set(info["features"]) >= {"avx2", "fma", "avx512f", "avx512bf16"}
    if "avx2" in info["supported_isas"]:
        assert info["features"]["avx2"] and info["features"]["fma"]
    if "avx512_bf16" in info["supported_isas"]:
        assert info["features"]["avx512bf16"]


def test_isa_can_be_forced_lower(monkeypatch):
    for isa in ops.supported_isas():
        monkeypatch.setenv(ops.ISA_ENV, isa)
        assert ops.cpu_info()["isa"] == isa


def test_bad_isa_requests_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown ISA"):
        ops.selected_isa("sse9")
    missing = [i for i in ("avx2", "avx512", "avx512_bf16") if i not in ops.supported_isas()]
    if missing:
        with pytest.raises(ValueError, match="not supported by this CPU"):
            ops.selected_isa(missing[-1])
    monkeypatch.setenv(ops.ISA_ENV, "bogus")
    with pytest.raises(ValueError, match="unknown ISA"):
        ops.cpu_info()
