"""bench/run.py's bundles: made once in the cache with `flare-rt import-nnunet`, kept, and made again over the
cached one with --rebuild-bundle (import-nnunet refuses an existing bundle unless told to replace it)."""
from __future__ import annotations

import argparse

import pytest
import run


@pytest.mark.slow
def test_the_cached_bundle_is_kept_then_rebuilt_on_request(tmp_path, demo_nnunet_dir):
    from flare_rt.bundle import Bundle

    args = argparse.Namespace(bundle=None, cache=tmp_path / "cache", model_dir=demo_nnunet_dir, fold="0",
                              rebuild_bundle=False, timeout=600)
    bundle = args.cache / f"{demo_nnunet_dir.name}_fold0_fp32.onnx"
    bundle.parent.mkdir(parents=True)
    bundle.write_bytes(b"a bundle made earlier")
    assert run.ensure_bundle(args) == (bundle, None)
    assert bundle.read_bytes() == b"a bundle made earlier"  # kept: made once
    args.rebuild_bundle = True
    made, error = run.ensure_bundle(args)
    assert (made, error) == (bundle, None)
    assert Bundle.load(bundle).meta.precision == "fp32"


def test_the_variant_recipe_is_a_quantize_call_that_replaces_what_it_rebuilds(tmp_path):
    """ensure_variant makes a variant only when absent or on --rebuild-bundle, so its quantize call (parsed by
    flare-rt's own parser) may replace the variant."""
    from flare_rt.cli import build_parser

    cmd = run.variant_command(tmp_path / "m_fp32.onnx", tmp_path / "m_int8.onnx", "int8", tmp_path, 2)
    assert cmd[1:3] == ["-m", "flare_rt"]
    args = build_parser().parse_args(cmd[3:])
    assert (args.command, args.bundle, args.output) == ("quantize", str(tmp_path / "m_fp32.onnx"),
                                                        str(tmp_path / "m_int8.onnx"))
    assert args.overwrite and args.precision == "int8" and args.calibration.endswith("ts_dicom")
    assert len(args.check) == 2
