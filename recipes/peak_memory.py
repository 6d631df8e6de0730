"""Peak memory of training, as a Trainer callback (what recipes/clm.py writes as `train_peak_*` into metrics.json).

- CPU: the process's peak resident set size (RSS) between `on_train_begin` and `on_train_end`. At `on_train_begin`
  the garbage collector runs, glibc returns freed heap pages (`malloc_trim`), and the kernel's RSS high-water mark
  (VmHWM, what `getrusage` reports as ru_maxrss) is reset to the current RSS through `/proc/self/clear_refs` (Linux
  >= 4.0), so the transient peak of loading the model cannot hide the training peak. Where that reset is refused
  the high-water mark is used as it is and `train_peak_memory_note` says so. RSS counts every allocation of the
  process (torch's tensors, Python, the tokenizer), not only tensors.
- CUDA: `torch.cuda.max_memory_allocated()` over the same interval (tensors only).

benchmarks/bench_trainer.py measures the same way (its `StepClock`); one process per measured setting gives each its
own allocator, so compare runs, never two settings inside one process.
"""

from __future__ import annotations

import gc

import torch
from transformers import TrainerCallback

from hf_smooth.demo.memory import reset_rss_peak, status_kib, trim_heap

_MIB = 1024 * 1024


class PeakMemoryCallback(TrainerCallback):
    """Records `metrics` = {"train_peak_memory_mib", "train_peak_memory_extra_mib", "train_peak_memory_kind"} (extra:
    above the memory at the start of training), plus "train_peak_memory_note" when the measure is weaker."""

    def __init__(self):
        self.metrics: dict = {}

    def _device(self, args):
        return args.device if args.device.type == "cuda" else None

    def on_train_begin(self, args, state, control, **kwargs):
        gc.collect()
        self.note = None
        device = self._device(args)
        if device is not None:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            return
        trim_heap()
        try:
            if reset_rss_peak():
                self.base = status_kib("VmRSS") * 1024
            else:
                self.base = status_kib("VmHWM") * 1024
                self.note = "clear_refs refused: the peak includes whatever came before training (model loading)"
        except (OSError, RuntimeError):  # no /proc (not Linux)
            self.base = None

    def on_train_end(self, args, state, control, **kwargs):
        device = self._device(args)
        if device is not None:
            torch.cuda.synchronize(device)
            peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
        elif self.base is None:
            self.metrics = {"train_peak_memory_note": "no /proc/self/status: peak memory not measured"}
            return
        else:
            peak, kind = status_kib("VmHWM") * 1024, "cpu_peak_rss"
        self.metrics = {
            "train_peak_memory_kind": kind, "train_peak_memory_mib": peak / _MIB,
            "train_peak_memory_extra_mib": (peak - self.base) / _MIB,
        }
        if self.note:
            self.metrics["train_peak_memory_note"] = self.note
