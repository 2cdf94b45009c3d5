"""fairnet_peft: FairNet (dynamic, instance-level fairness correction) as a HuggingFace PEFT method.

Importing this package registers the PEFT type ``FAIRLORA``, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModel*`` and transformers' ``model.load_adapter`` handle FairLoRA adapters. Import it before loading.

Layout (docs/architecture.md): ``tuner/`` is the PEFT method (config, LoRA layer, detector, gate, representation),
``training/`` `FairTrainer` and what it computes (run state, passes, losses, prototypes, pseudo-labels, selection),
``metrics`` the fairness metrics users call (``from fairnet_peft import metrics``), ``evaluation/`` what the metrics
are built on and what presents them (counting, τ sweep, plots, model card), ``data/`` the shipped datasets and
label-setting helpers. Every public name has one import path: the module it is defined in, or this package.
"""

from ._registration import register as _register

_register()

from . import metrics  # noqa: E402
from .tuner.config import FairLoraConfig  # noqa: E402
from .tuner.gate import GateRecord, force_gate, gate_record  # noqa: E402
from .tuner.model import FairLoraModel  # noqa: E402
from .training.arguments import FairTrainingArguments  # noqa: E402
from .training.trainer import FairTrainer  # noqa: E402
from .evaluation.model_card import attach_fairness_report, write_model_card  # noqa: E402
from .evaluation.sweep import threshold_sweep  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FairLoraConfig", "FairLoraModel", "GateRecord", "force_gate", "gate_record", "FairTrainer",
           "FairTrainingArguments", "attach_fairness_report", "write_model_card", "threshold_sweep", "metrics"]
