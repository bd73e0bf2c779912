"""nnU-Net v2's own predictor as the benchmark peer, run in its own process by bench/run.py.

``--mode staged`` (the default) drives the predictor's own functions in the order
``predict_from_files`` uses them and times each one:

1. model load  ``nnUNetPredictor.initialize_from_trained_model_folder``
2. read        ``plans_manager.image_reader_writer_class().read_images`` (SimpleITKIO)
3. preprocess  ``configuration_manager.preprocessor_class().run_case_npy`` — ``run_case`` minus its read,
               as ``preprocess_fromfiles_save_to_queue`` calls it — then ``torch.from_numpy(...).float()``
4. window      ``predictor.predict_logits_from_preprocessed_data(data).cpu().numpy()``
               (network = time inside ``_internal_maybe_mirror_and_predict``, i.e. the forward passes)
5. export      ``convert_predicted_logits_to_segmentation_with_correct_shape`` (logits resampling, argmax)
6. write       ``image_reader_writer_class().write_seg``

``--mode files`` runs plain ``predictor.predict_from_files`` (spawned preprocessing and export
workers, 1 each) as a check that the staged run costs about the same.

``--device cuda`` runs the predictor on the GPU as nnU-Net does by default there
(``perform_everything_on_device=True``: the sliding window and its accumulator on the device, the
logits then brought back for the CPU export); the network time is then measured with a
``torch.cuda.synchronize()`` after each forward (the only change: it takes away a little overlap of
CPU launch and GPU work).

``--io nibabel`` reads and writes with nnU-Net's ``NibabelIO`` instead of the plans' ``SimpleITKIO``
(``auto``, the default: SimpleITK when it is installed). nnU-Net imports SimpleITK at module level in
modules the predictor needs but calls it only through ``SimpleITKIO``; where SimpleITK is absent (the
GPU test machine: its wheel is 53 MB) a stand-in module is installed whose every use fails loudly.

Writes a JSON report (timings, tiles, shapes) like ``flare-rt segment --report``.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from importlib.machinery import ModuleSpec  # noqa: E402
from pathlib import Path  # noqa: E402

IO_CLASSES = {"simpleitk": "SimpleITKIO", "nibabel": "NibabelIO"}


class StandInUsed(AttributeError):
    """SimpleITK was used although only a stand-in is installed."""


def install_simpleitk_stand_in() -> bool:
    """Put a stand-in ``SimpleITK`` into ``sys.modules`` when the real one cannot be imported (True then).

    Attribute lookups on it raise :class:`StandInUsed` (an AttributeError, so ``hasattr`` probes of
    module scanners still work) naming the fix."""
    try:
        import SimpleITK  # noqa: F401
        return False
    except ImportError:
        pass
    mod = types.ModuleType("SimpleITK", "stand-in: SimpleITK is not installed (bench/nnunet_peer.py)")
    mod.__spec__ = ModuleSpec("SimpleITK", None)

    def __getattr__(name: str):
        raise StandInUsed(f"SimpleITK.{name} was used but SimpleITK is not installed (only a stand-in module is): "
                          "run the nnU-Net peer with --io nibabel, or pip install SimpleITK")

    mod.__getattr__ = __getattr__
    sys.modules["SimpleITK"] = mod
    return True


def pick_io(choice: str, simpleitk_installed: bool) -> str:
    """nnU-Net reader/writer class name for ``--io``: ``auto`` keeps SimpleITK where it is installed."""
    if choice == "auto":
        choice = "simpleitk" if simpleitk_installed else "nibabel"
    if choice == "simpleitk" and not simpleitk_installed:
        raise SystemExit("nnU-Net peer: --io simpleitk but SimpleITK is not installed; use --io nibabel or auto")
    return IO_CLASSES[choice]


def _env(threads: int) -> None:
    # nnU-Net reads these at import time: default_num_processes caps torch threads in
    # predict_logits_from_preprocessed_data and sets them in the export (default 8).
    os.environ.setdefault("nnUNet_def_n_proc", str(threads))
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(key, "/tmp/nnunet_unused")


def make_predictor(model_dir: str, fold: str, checkpoint: str, step: float, threads: int, device: str = "cpu",
                   io: str = "SimpleITKIO"):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("nnU-Net peer: --device cuda but torch sees no CUDA device")
    torch.set_num_threads(threads)
    predictor = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device == "cuda", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_dir, use_folds=(fold,), checkpoint_name=checkpoint)
    # the reader/writer the predictor (and its data iterator) uses comes from the plans
    predictor.plans_manager.plans["image_reader_writer"] = io
    return predictor


def run_staged(args, timings: dict) -> dict:
    import numpy as np
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    timings["import"] = time.perf_counter() - T_START
    t = time.perf_counter()
    predictor = make_predictor(args.model_dir, args.fold, args.checkpoint, args.step, args.threads, args.device,
                               args.io_class)
    if args.device == "cuda":
        torch.cuda.synchronize()
    timings["model_load"] = time.perf_counter() - t

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    rw = pm.image_reader_writer_class()

    t = time.perf_counter()
    data, props = rw.read_images([args.input])
    timings["read"] = time.perf_counter() - t

    t = time.perf_counter()
    preprocessor = cm.preprocessor_class(verbose=False)
    data, _, props = preprocessor.run_case_npy(data, None, props, pm, cm, predictor.dataset_json)
    data = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)
    timings["preprocess"] = time.perf_counter() - t

    # tile count: the predictor's own slicers on the padded shape (pad_nd_image pads up to the patch)
    padded = [max(s, p) for s, p in zip(data.shape[1:], cm.patch_size)]
    tiles = len(predictor._internal_get_sliding_window_slicers(tuple(padded)))
    net_time = [0.0]
    forward = predictor._internal_maybe_mirror_and_predict
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed_forward(x):
        sync()
        t0 = time.perf_counter()
        out = forward(x)
        sync()
        net_time[0] += time.perf_counter() - t0
        return out

    predictor._internal_maybe_mirror_and_predict = timed_forward
    on_device: list[bool] = []  # nnU-Net reruns the whole window with results on the CPU after any RuntimeError
    window = predictor._internal_predict_sliding_window_return_logits

    def recorded_window(data, slicers, do_on_device=True):
        on_device.append(bool(do_on_device))
        return window(data, slicers, do_on_device)

    predictor._internal_predict_sliding_window_return_logits = recorded_window
    t = time.perf_counter()
    logits = predictor.predict_logits_from_preprocessed_data(data).cpu().detach().numpy()
    timings["window"] = time.perf_counter() - t
    timings["network"] = net_time[0]
    network_shape = list(data.shape[1:])
    del data

    t = time.perf_counter()
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, pm, cm, predictor.label_manager, props, return_probabilities=False, num_threads_torch=args.threads)
    timings["export"] = time.perf_counter() - t
    del logits

    t = time.perf_counter()
    rw.write_seg(seg, args.output, props)
    timings["write"] = time.perf_counter() - t
    return {"tiles": tiles, "network_shape": network_shape, "labels_present": np.unique(seg).tolist(),
            "window_results_on_device": on_device,
            "fell_back_to_cpu_results": args.device == "cuda" and on_device != [True]}


def run_files(args, timings: dict) -> dict:
    timings["import"] = time.perf_counter() - T_START
    t = time.perf_counter()
    predictor = make_predictor(args.model_dir, args.fold, args.checkpoint, args.step, args.threads, args.device,
                               args.io_class)
    timings["model_load"] = time.perf_counter() - t
    ending = predictor.dataset_json["file_ending"]
    out = Path(args.output)
    if not out.name.endswith(ending):
        raise SystemExit(f"--mode files writes {ending} files; got output {out}")
    truncated = str(out)[: -len(ending)]
    t = time.perf_counter()
    predictor.predict_from_files([[args.input]], [truncated], save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    timings["predict_from_files"] = time.perf_counter() - t
    return {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--fold", default="0")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--step", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=["staged", "files"], default="staged")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--io", choices=["auto", *IO_CLASSES], default="auto",
                   help="nnU-Net reader/writer: SimpleITKIO (the plans'), NibabelIO, or auto (SimpleITK if installed)")
    p.add_argument("--report", required=True)
    args = p.parse_args(argv)
    _env(args.threads)
    stand_in = install_simpleitk_stand_in()
    args.io_class = pick_io(args.io, simpleitk_installed=not stand_in)
    timings: dict[str, float] = {}
    extra = (run_staged if args.mode == "staged" else run_files)(args, timings)
    from importlib.metadata import version

    import torch

    if args.device == "cuda":
        backend = (f"torch {torch.__version__} cuda ({torch.cuda.get_device_name()}), perform_everything_on_device, "
                   f"{torch.get_num_threads()} CPU threads")
    else:
        backend = f"torch {torch.__version__} cpu, {torch.get_num_threads()} threads"
    report = {"input": args.input, "output": args.output, "mode": f"nnunet-{args.mode}", "backend": backend,
              "device": args.device, "io": args.io_class, "simpleitk_stand_in": stand_in,
              "nnunetv2": version("nnunetv2"), "timings_s": timings,
              "total_s": time.perf_counter() - T_START, **extra}
    Path(args.report).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":  # predict_from_files spawns workers that re-import this module
    sys.exit(main())
