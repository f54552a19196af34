"""Pretrained models: loading (bundle, checkpoint + network config, TorchScript; `loading`, with what the config
declares read by `declared`), the loaded model (`loaded`), saving an adapted one (`bundle`), class mapping,
preprocessing from what the model declares, and its inverse."""

from __future__ import annotations

from asfda.models.bundle import save_bundle
from asfda.models.classmap import (
                                    ClassMap,
                                    ClassMappedNetwork,
                                    OutputAsLogits,
                                    build_class_map,
                                    parse_class_map_override,
)
from asfda.models.loaded import LoadedModel, clone_module, state_dict_hash
from asfda.models.loading import load_model
from asfda.models.preprocessing import PreparedVolume, Preprocessing, prepare_case, resample_to_native

__all__ = [
    "ClassMap",
    "ClassMappedNetwork",
    "LoadedModel",
    "OutputAsLogits",
    "PreparedVolume",
    "Preprocessing",
    "build_class_map",
    "clone_module",
    "load_model",
    "parse_class_map_override",
    "prepare_case",
    "resample_to_native",
    "save_bundle",
    "state_dict_hash",
]
