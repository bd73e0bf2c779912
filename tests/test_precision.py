"""Precision variants: the agreement record, the `auto` selection rule on a CPU, bundle metadata."""
from __future__ import annotations

from dataclasses import replace

import pytest

from flare_rt.bundle import VARIANT_FORMAT_VERSION, BundleMeta, CTNormalization, describe
from flare_rt.errors import BackendUnavailableError, ModelError
from flare_rt.precision import (BOUND, CPU_ORDER, CaseAgreement, Choice, FileHash, PrecisionRecord, choose_cpu,
                                require_float_weights)

ALL = frozenset(CPU_ORDER)


def case(name: str, dice: float = 0.995, network: float = 0.9995) -> CaseAgreement:
    return CaseAgreement(FileHash(name, name * 4), {"liver": 0.999, "stomach": dice}, 1000, network, 0.9999, 10**6)


def record(precision: str = "bf16", checks=(case("ircad01"), case("ts269")), calibration=(), backend="openvino"):
    return PrecisionRecord(precision, "test", backend, FileHash("fp32.onnx", "ab" * 32), tuple(calibration),
                           tuple(checks))


def meta(**kw) -> BundleMeta:
    return BundleMeta(name="t", labels={0: "background", 1: "liver"}, spacing=(4.0, 1.2, 1.2), patch_size=(32, 64, 64),
                      normalization=CTNormalization(0.0, 1.0, -100.0, 100.0), architecture={}, **kw)


# -- the bound ------------------------------------------------------------------------------------
def test_proven_needs_every_check_case_within_the_bound():
    assert record().proven() == (True, "meets the bound on 2 check cases")
    ok, why = record(checks=(case("ircad01"), case("ts269", dice=0.989))).proven()
    assert not ok and "ts269" in why and "0.9890" in why
    ok, why = record(checks=(case("ircad01", network=0.9989), case("ts269"))).proven()
    assert not ok and "ircad01" in why
    # exactly at the bound is enough
    edge = case("a", dice=BOUND.min_dice, network=BOUND.min_network_agreement)
    assert record(checks=(edge, replace(edge, case=FileHash("b", "b")))).proven()[0]


def test_proven_needs_two_check_cases_not_in_the_calibration_set():
    ok, why = record(checks=(case("ircad01"),)).proven()
    assert not ok and "1 check case(s) recorded, 2 needed" in why
    leaked = record(precision="int8", calibration=(FileHash("copy_of_ircad01", "ircad01" * 4),))
    ok, why = leaked.proven()
    assert not ok and "calibration set" in why and "ircad01" in why


# -- auto on a CPU --------------------------------------------------------------------------------
def test_fp32_and_fp16_bundles_run_fp32_in_the_fixed_order():
    for precision in ("fp32", "fp16"):
        assert choose_cpu(precision, None, ALL, cpu_bf16=True) == [
            Choice("openvino", "fp32", "fp32 is always proven"), Choice("onnxruntime", "fp32", "fp32 is always proven"),
            Choice("torch", "fp32", "fp32 is always proven")]
    assert [c.backend for c in choose_cpu("fp32", None, {"torch", "onnxruntime"}, True)] == ["onnxruntime", "torch"]
    assert choose_cpu("fp32", None, set(), True) == []


def test_proven_bf16_runs_bf16_on_its_backend_first():
    got = choose_cpu("bf16", record(), ALL, cpu_bf16=True)
    assert [(c.backend, c.compute) for c in got] == [("openvino", "bf16"), ("onnxruntime", "fp32"), ("torch", "fp32")]


def test_bf16_falls_back_to_fp32_when_unproven_or_without_cpu_support():
    unproven = record(checks=(case("ircad01"), case("ts269", network=0.998)))
    for rec, bf16, why in ((unproven, True, "below the bound"), (record(), False, "no bf16 on this CPU"),
                           (None, True, "no agreement record")):
        got = choose_cpu("bf16", rec, ALL, cpu_bf16=bf16)
        assert [(c.backend, c.compute) for c in got] == [(b, "fp32") for b in CPU_ORDER]
        assert why in got[0].reason
    # the measured backend is not installed: fp32 on the others
    got = choose_cpu("bf16", record(), {"onnxruntime"}, cpu_bf16=True)
    assert [(c.backend, c.compute) for c in got] == [("onnxruntime", "fp32")]


def test_int8_only_when_proven_and_only_on_its_backend():
    proven = record("int8", calibration=(FileHash("dicom", "d" * 64),))
    assert [(c.backend, c.compute) for c in choose_cpu("int8", proven, ALL, False)] == [("openvino", "int8")]
    assert choose_cpu("int8", replace(proven, checks=proven.checks[:1]), ALL, False) == []
    assert choose_cpu("int8", None, ALL, False) == []
    assert choose_cpu("int8", proven, {"onnxruntime", "torch"}, False) == []
    with pytest.raises(ModelError, match="unknown bundle precision 'int4'"):
        choose_cpu("int4", None, ALL, False)


# -- metadata -------------------------------------------------------------------------------------
def test_record_round_trips_through_the_bundle_json_and_info_shows_it():
    rec = record("int8", calibration=(FileHash("ts_dicom", "c" * 64),))
    m = meta(precision="int8", precision_record=rec, format_version=VARIANT_FORMAT_VERSION)
    back = BundleMeta.from_json(m.to_json())
    assert back == m and back.precision_record.checks[1].min_dice == pytest.approx(0.995)
    text = describe(back)
    assert "calibration ts_dicom (cccccccccccc)" in text
    assert "agreement   ircad01" in text and "network argmax 0.99950" in text
    assert "auto        uses this precision: meets the bound on 2 check cases" in text


def test_plain_bundles_keep_the_version_1_layout_and_old_metadata_loads():
    m = meta()
    assert "precision_record" not in m.to_json() and m.format_version == 1
    assert BundleMeta.from_json(m.to_json()).precision_record is None
    with pytest.raises(ModelError, match="format version 3 is newer"):
        BundleMeta.from_json(m.with_(format_version=3).to_json())


def test_quantised_bundles_are_refused_where_float_weights_are_needed():
    require_float_weights(meta(precision="bf16"), "b.onnx", "export")  # bf16 keeps the fp32 weights
    q = meta(precision="int8", precision_record=record("int8"))
    with pytest.raises(ModelError, match=r"b\.onnx: an int8 \(quantised\) bundle; export cannot run it: .*fp32\.onnx"):
        require_float_weights(q, "b.onnx", "export")
    with pytest.raises(BackendUnavailableError, match="the torch backend cannot run it"):
        require_float_weights(q, "b.onnx", "the torch backend", BackendUnavailableError)
