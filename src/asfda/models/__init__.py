"""Pretrained models: loading (bundle, checkpoint + network config, TorchScript), class mapping,
preprocessing from what the model declares, and its inverse."""

from __future__ import annotations

from asfda.models.classmap import (ClassMap, ClassMappedNetwork, OutputAsLogits, build_class_map,
                                    parse_class_map_override)
from asfda.models.loading import LoadedModel, clone_module, load_model, save_bundle, state_dict_hash
from asfda.models.preprocessing import Preprocessing, PreparedVolume, prepare_case, resample_to_native

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
