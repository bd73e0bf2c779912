"""``--backend auto`` on a CPU: the installed backends, in the order and at the precision that
:func:`flare_rt.precision.choose_cpu` gives for the bundle (its precision and recorded agreement)."""
from __future__ import annotations

import logging
from typing import Callable

from ..errors import ModelError
from ..precision import COMPUTE, CPU_ORDER, choose_cpu

log = logging.getLogger(__name__)


def auto_cpu(bundle, importable: Callable[[str], bool]) -> list[tuple[str, str, str]]:
    """``[(backend, "cpu", compute precision), ...]`` to try in order."""
    meta = bundle.meta
    installed = frozenset(b for b in CPU_ORDER if importable(b))
    bf16 = False
    if meta.precision == "bf16" and "openvino" in installed:
        from .openvino import cpu_has_bf16

        bf16 = cpu_has_bf16()
    choices = choose_cpu(meta.precision, meta.precision_record, installed, bf16)
    if not choices and meta.precision == "int8":
        why = meta.precision_record.proven()[1] if meta.precision_record else "no agreement record"
        raise ModelError(f"{bundle.path}: auto does not run this int8 bundle ({why}); pass --backend openvino or "
                         "onnxruntime to run it anyway, or use the fp32 bundle")
    if choices and choices[0].compute != COMPUTE[meta.precision]:
        log.info("%s: %s", bundle.path.name, choices[0].reason)
    return [(c.backend, "cpu", c.compute) for c in choices]
