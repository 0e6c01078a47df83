"""transformers' own format of a converted model: the legacy key names ``save_pretrained`` writes, the config its
Auto classes read, the image processor it ships."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from robustvit.conversion.transformers_metadata import processor_for, write_remote_code
from robustvit.families import FAMILIES
from robustvit.persistence.native_format import NATIVE_FORMATS, NativeFormat

__all__ = ["TransformersFormat"]


class TransformersFormat(NativeFormat):
    def saved_key_names(self, model: nn.Module) -> dict[str, str]:
        # save_pretrained writes the legacy 4.x names (transformers' conversion mapping, reverted); map them back.
        state = model.state_dict()
        ids = {id(tensor): name for name, tensor in state.items()}
        saved = revert_weight_conversion(model, dict(state))
        return {saved_name: ids[id(tensor)] for saved_name, tensor in saved.items()}

    def library_config(self, model: nn.Module) -> dict:
        return {**model.config.to_dict(), "architectures": [type(model).__name__]}

    def image_processor(self, model: nn.Module):
        return processor_for(model.config)

    def write_library_files(self, model: nn.Module, directory: Path) -> None:
        write_remote_code(directory)  # the loader that the config's auto_map names


for _name, _family in FAMILIES.items():
    if _family.library == "transformers":
        NATIVE_FORMATS.register(_name, TransformersFormat())
