"""An ESTIMATE of flare-rt on the FLARE organisers' card (NVIDIA Quadro RTX 5000, Turing) from stage times
measured on another GPU and the network's FLOPs.

    python bench/estimate.py RESULTS.json          # lines for every flare-rt GPU fast system of the run

Nothing here is a measurement on an RTX 5000. The network's work per tile is computed from the U-Net's
architecture (:func:`unet_cost`: convolution FLOPs exactly, activation traffic roughly); each measured
stage is scaled by the ratio of the resource it is assumed to be bound by (:data:`STAGE_RESOURCE`):

- the network by the larger of the fp16 tensor-core and memory-bandwidth ratios (the small 3D U-Net is
  partly bandwidth-bound; launch-bound work scales less, so this leans pessimistic), with the
  roofline floor (all FLOPs at the card's peak) beside it;
- GPU array stages (normalisation, resampling, blending, label upsampling, paste) by the bandwidth
  ratio; float64 work (faithful mode) may instead be bound by fp64 throughput, 1/32 of fp32 on Turing;
- host↔device copies by the PCIe ratio;
- CPU stages (start-up, read, write, model load) are left as measured: they depend on the host CPU and
  disk, not the card.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from benchpath import BENCH, REPO  # noqa: E402,F401  (sys.path: this checkout)


@dataclass(frozen=True)
class Card:
    name: str
    fp16_tensor_flops: float  # dense, FLOP/s
    fp32_flops: float
    fp64_flops: float
    bandwidth: float  # bytes/s
    pcie: float  # bytes/s host<->device, practical


#: Datasheet peaks (dense); PCIe: practical pinned-copy rates of the link generation.
CARDS = {
    "RTX 5000": Card("Quadro RTX 5000 (Turing TU104, 48 SMs)", 89.2e12, 11.2e12, 0.35e12, 448e9, 12e9),
    "H200": Card("H200 SXM (Hopper)", 989e12, 67e12, 34e12, 4.8e12, 50e9),
    "H100": Card("H100 SXM (Hopper)", 989e12, 67e12, 34e12, 3.35e12, 50e9),
    "A100": Card("A100 SXM (Ampere)", 312e12, 19.5e12, 9.7e12, 2.0e12, 24e9),
}
TARGET = CARDS["RTX 5000"]

#: Which resource bounds a stage (flare-rt report keys); unknown keys are taken as GPU bandwidth-bound.
STAGE_RESOURCE = {
    "startup": "host", "model_load": "host", "read": "host", "write": "host",
    "network": "network",
    "upload": "pcie", "download": "pcie",
    "preprocess": "bandwidth", "blend+resample": "bandwidth", "export": "bandwidth",
}


def card_for(device_name: str | None) -> Card | None:
    if not device_name:
        return None
    for key, card in CARDS.items():
        if key.lower() in device_name.lower():
            return card
    return None


# -- the network's work --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetCost:
    conv_flops: float  # 2 × multiply-adds of every convolution, transposed convolution and the output head
    activation_bytes: float  # rough fp16 activation traffic of one forward pass (reads + writes)
    layers: int


def _conv_out(shape, stride):
    return tuple(math.ceil(s / st) for s, st in zip(shape, stride))


def unet_cost(arch: dict, patch, batch: int = 1, bytes_per_value: int = 2) -> NetCost:
    """FLOPs and activation traffic of one forward pass of a ``PlainConvUNet`` (flare-rt's
    :class:`~flare_rt.nets.UNetConfig` fields) on ``batch`` tiles of ``patch`` voxels.

    Convolutions: 2 × C_in × C_out × kernel volume × output voxels (bias ignored). Transposed
    convolutions (kernel = stride): 2 × C_in × C_out × output voxels. Traffic: each convolution reads
    its input and writes its output; each InstanceNorm+LeakyReLU reads twice and writes once; the skip
    concatenation copies both halves."""
    feats, kernels, strides = arch["features_per_stage"], arch["kernel_sizes"], arch["strides"]
    n_enc, n_dec = arch["n_conv_per_stage"], arch["n_conv_per_stage_decoder"]
    vol = lambda shape: math.prod(shape)  # noqa: E731
    flops = traffic = 0.0
    layers = 0
    shape, cin = tuple(patch), arch.get("in_channels", 1)
    shapes = []
    for s, cout in enumerate(feats):
        for i in range(n_enc[s]):
            out_shape = _conv_out(shape, strides[s]) if i == 0 else shape
            flops += 2 * cin * cout * vol(kernels[s]) * vol(out_shape)
            traffic += (cin * vol(shape) + cout * vol(out_shape)) + 3 * cout * vol(out_shape)
            shape, cin = out_shape, cout
            layers += 1
        shapes.append(shape)
    for d in range(1, len(feats)):
        below, skip = feats[-d], feats[-(d + 1)]
        up_shape = shapes[-(d + 1)]
        flops += 2 * below * skip * vol(up_shape)  # transposed conv, kernel = stride
        traffic += below * vol(shapes[-d]) + skip * vol(up_shape) + 2 * 2 * skip * vol(up_shape)  # + concat copy
        cin = 2 * skip
        for _ in range(n_dec[d - 1]):
            flops += 2 * cin * skip * vol(kernels[-(d + 1)]) * vol(up_shape)
            traffic += (cin + skip) * vol(up_shape) + 3 * skip * vol(up_shape)
            cin = skip
            layers += 1
        layers += 1
    flops += 2 * feats[0] * arch["num_classes"] * vol(shapes[0])  # output head (1×1×1)
    traffic += (feats[0] + arch["num_classes"]) * vol(shapes[0])
    return NetCost(batch * flops, batch * traffic * bytes_per_value, layers + 1)


# -- the estimate ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageEstimate:
    stage: str
    measured_s: float
    resource: str
    factor: float  # estimated / measured
    note: str = ""

    @property
    def estimated_s(self) -> float:
        return self.measured_s * self.factor


def stage_estimates(stage_times: dict[str, float], source: Card, target: Card = TARGET,
                    fp64: bool = False) -> list[StageEstimate]:
    out = []
    bw = source.bandwidth / target.bandwidth
    for stage, t in stage_times.items():
        if t is None:
            continue
        res = STAGE_RESOURCE.get(stage, "bandwidth")
        note = "" if stage in STAGE_RESOURCE else "unknown stage: assumed GPU bandwidth-bound"
        if res == "host":
            factor, note = 1.0, "CPU/disk: as measured (host-dependent)"
        elif res == "network":
            factor = max(source.fp16_tensor_flops / target.fp16_tensor_flops, bw)
        elif res == "pcie":
            factor = source.pcie / target.pcie
        else:
            factor = bw
            if fp64:
                note = (f"float64 work: ×{source.fp64_flops / target.fp64_flops:.0f} if fp64-bound "
                        f"(Turing fp64 = 1/32 fp32)") + (f"; {note}" if note else "")
        out.append(StageEstimate(stage, float(t), res, factor, note))
    return out


def report_lines(result: dict, meta=None) -> list[str]:
    """The estimate section for every flare-rt GPU system of a bench/run.py result (warm medians)."""
    lines = [f"## ESTIMATE for the {TARGET.name} — not a measurement", "",
             f"Target peaks: {TARGET.fp16_tensor_flops / 1e12:.1f} TFLOP/s fp16 tensor, {TARGET.fp32_flops / 1e12:.1f} "
             f"TFLOP/s fp32, {TARGET.bandwidth / 1e9:.0f} GB/s; stages scaled by the ratio of the resource each is "
             "assumed bound by (bench/estimate.py); CPU stages as measured.", ""]
    if meta is None:
        meta = _bundle_meta(result)
    cost = unet_cost(meta.architecture, meta.patch_size) if meta is not None else None
    if cost is not None:
        lines.append(f"Network: {cost.conv_flops / 1e9:.1f} GFLOP per {'×'.join(map(str, meta.patch_size))} tile "
                     f"({cost.layers} layers), about {cost.activation_bytes / 1e6:.0f} MB of fp16 activation traffic "
                     "per tile (rough).")
    any_system = False
    for case_name, c in result.get("cases", {}).items():
        for name, entry in c["systems"].items():
            s = entry.get("summary", {})
            if not (s.get("ok") and name.startswith("cuda_") and result["systems"][name]["kind"] == "flare"):
                continue
            typ = s.get("warm") or s.get("cold") or {}
            stages = typ.get("stage_times_median_s") or {}
            source = card_for(s.get("device"))
            if source is None:
                lines += ["", f"{case_name} / {name}: no datasheet for {s.get('device')!r}: no estimate"]
                continue
            any_system = True
            est = stage_estimates(stages, source, fp64="faithful" in name)
            total_m = sum(e.measured_s for e in est)
            total_e = sum(e.estimated_s for e in est)
            lines += ["", f"### {case_name} / {name} (measured on {s.get('device')}, warm medians)", "",
                      "| stage | measured s | bound by | × | estimated s | share | note |",
                      "|---|---|---|---|---|---|---|"]
            for e in sorted(est, key=lambda e: -e.estimated_s):
                lines.append(f"| {e.stage} | {e.measured_s:.3f} | {e.resource} | {e.factor:.1f} | "
                             f"{e.estimated_s:.2f} | {100 * e.estimated_s / total_e:.0f} % | {e.note} |")
            lines.append(f"| **total** | {total_m:.2f} | | | **{total_e:.1f}** | | FLARE limit 15 s |")
            tiles = s.get("tiles")
            if cost is not None and tiles:
                floor = tiles * cost.conv_flops / TARGET.fp16_tensor_flops
                measured_net = stages.get("network")
                achieved = (tiles * cost.conv_flops / measured_net / 1e12) if measured_net else None
                lines.append("")
                lines.append(f"Network floor on the target: {tiles} tiles × {cost.conv_flops / 1e9:.1f} GFLOP at "
                             f"peak = {floor:.2f} s" + (f"; achieved on {s.get('device')}: {achieved:.1f} TFLOP/s "
                                                        f"({100 * achieved * 1e12 / source.fp16_tensor_flops:.1f} % "
                                                        "of its fp16 peak)" if achieved else ""))
            top = sorted(est, key=lambda e: -e.estimated_s)[:2]
            lines.append("Dominant stages (estimate): " + ", ".join(
                f"{e.stage} {100 * e.estimated_s / total_e:.0f} %" for e in top) + ".")
            mem = typ.get("gpu_max_minus_idle_mib")
            if mem:
                lines.append(f"GPU memory: the allocations do not depend on the card ({mem['median']:.0f} MiB above "
                             f"idle here); the whole-device figure on the target adds its own CUDA context.")
    if not any_system:
        lines += ["", "No successful flare-rt GPU run to scale."]
    return lines


def _bundle_meta(result: dict):
    bundle = result.get("config", {}).get("bundle")
    if not bundle or not Path(bundle).is_file():
        return None
    from flare_rt.bundle import read_meta

    return read_meta(bundle)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="RTX 5000 estimate from a bench/run.py GPU result (an ESTIMATE)")
    p.add_argument("results", type=Path)
    p.add_argument("--bundle", type=Path, help="bundle whose architecture to cost (default: the run's)")
    args = p.parse_args(argv)
    result = json.loads(args.results.read_text())
    meta = None
    if args.bundle:
        from flare_rt.bundle import read_meta

        meta = read_meta(args.bundle)
    sys.stdout.write("\n".join(report_lines(result, meta)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
