"""Register FAIRLORA with PEFT: extend the closed `PeftType` enum, then `register_peft_method` (idempotent).

PEFT has no plugin discovery: `PeftType` is a closed (str, Enum) and the registry only accepts names that are
members of it. We add the member the way `Enum` stores members (all three internal maps plus the class attribute,
which `list(PeftType)` and lookups by value and name need on CPython 3.10-3.13), then register the config and tuner
with the collision-free prefix "fairlora_". Re-importing or reloading the package is a no-op.
"""

from __future__ import annotations

from peft.utils import PeftType
from peft.utils.peft_types import register_peft_method

NAME = "FAIRLORA"


def _extend_peft_type() -> PeftType:
    if NAME in PeftType.__members__:
        return PeftType[NAME]
    member = str.__new__(PeftType, NAME)
    member._name_ = NAME
    member._value_ = NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[NAME] = member
    PeftType._value2member_map_[NAME] = member
    if NAME not in PeftType._member_names_:
        PeftType._member_names_.append(NAME)
    type.__setattr__(PeftType, NAME, member)
    return member


def register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = _extend_peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    from .tuner.config import FairLoraConfig
    from .tuner.model import FairLoraModel

    register_peft_method(name="fairlora", config_cls=FairLoraConfig, model_cls=FairLoraModel, prefix="fairlora_")
