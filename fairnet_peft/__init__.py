"""fairnet_peft: FairNet (dynamic, instance-level fairness correction) as a HuggingFace PEFT method.

Importing this package registers the PEFT type ``FAIRLORA``, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModel*`` and transformers' ``model.load_adapter`` handle FairLoRA adapters. Import it before loading.
"""

from ._registration import register as _register

_register()

from .config import FairLoraConfig  # noqa: E402
from .gate import GateRecord, force_gate, gate_record  # noqa: E402
from .model import FairLoraModel  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FairLoraConfig", "FairLoraModel", "GateRecord", "force_gate", "gate_record"]

from .trainer import FairTrainer  # noqa: E402
from .training_args import FairTrainingArguments  # noqa: E402

__all__ += ["FairTrainer", "FairTrainingArguments"]

from .model_card import attach_fairness_report, write_model_card  # noqa: E402
from .sweep import threshold_sweep  # noqa: E402

__all__ += ["attach_fairness_report", "write_model_card", "threshold_sweep"]
