"""Settings that take one of a few strings: one check (`asfda.options.check_option`), exact values only, the valid
ones named, and MONAI's "did you mean" when the value is a near miss."""

from __future__ import annotations

import pytest
import torch

from asfda.config import load_config
from asfda.engine import INFERENCE_PRECISIONS
from asfda.errors import AsfdaError
from asfda.models.loading import OUTPUT_ACTIVATIONS
from asfda.options import PRECISIONS as OPTION_PRECISIONS
from asfda.options import PSEUDO_SOURCES, check_option, closest_option
from asfda.selection import DIVERSITY_SPACES, REPRESENTATIVENESS, ROUND0_GAPS
from asfda.selection.strategies import ASFDAStrategy
from asfda.training import TrainConfig
from asfda.training.augment import AUGMENTATIONS, PatchAugmenter
from asfda.training.trainer import PRECISIONS


def test_the_option_tuples_are_unchanged() -> None:
    # the CLI's choices, YAML configs and project.json hold these strings
    assert DIVERSITY_SPACES == ("anatomy", "embedding", "none", "batch")
    assert ROUND0_GAPS == ("feature_gap", "norm_kl")
    assert REPRESENTATIVENESS == ("none", "density", "typical", "complete", "coverage", "trimmed")
    assert PSEUDO_SOURCES == ("previous", "warmup")
    assert AUGMENTATIONS == ("none", "intensity", "spatial_mr")
    assert PRECISIONS == INFERENCE_PRECISIONS == ("fp32", "bf16")
    assert INFERENCE_PRECISIONS is OPTION_PRECISIONS  # one list: inference and fine-tuning take the same values
    assert OUTPUT_ACTIVATIONS == ("softmax", "sigmoid", "none")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("diversity", "embeding",
     "diversity must be one of ['anatomy', 'embedding', 'none', 'batch'], got 'embeding' (did you mean 'embedding'?)"),
    ("round0_gap", "norm-kl",
     "round0_gap must be one of ['feature_gap', 'norm_kl'], got 'norm-kl' (did you mean 'norm_kl'?)"),
    ("representativeness", "typicl",
     "representativeness must be one of ['none', 'density', 'typical', 'complete', 'coverage', 'trimmed'], "
     "got 'typicl' "
     "(did you mean 'typical'?)"),
    ("semi.pseudo_from", "warm",
     "semi.pseudo_from must be one of ['previous', 'warmup'], got 'warm' (did you mean 'warmup'?)"),
    ("train.augmentation", "spatial",
     ("train.augmentation must be one of ['none', 'intensity', 'spatial_mr'], got 'spatial' (did you mean "
      "'spatial_mr'?)")),
    ("train.precision", "fp8", "train.precision must be one of ['fp32', 'bf16'], got 'fp8' (did you mean 'fp32'?)"),
    ("output_activation", "softmx",
     "output_activation must be one of ['softmax', 'sigmoid', 'none'], got 'softmx' (did you mean 'softmax'?)"),
    ("diversity", "cosine-distances",
     # nothing close: no guess
     "diversity must be one of ['anatomy', 'embedding', 'none', 'batch'], got 'cosine-distances'"),
    ("train.precision", " bf16",  # exact values only (MONAI's look-up would strip the spaces and take it)
     "train.precision must be one of ['fp32', 'bf16'], got ' bf16' (did you mean 'bf16'?)"),
    ("diversity", "Embedding",  # no case folding
     "diversity must be one of ['anatomy', 'embedding', 'none', 'batch'], got 'Embedding' (did you mean 'embedding'?)"),
])
def test_run_config_refuses_with_the_valid_values_and_a_guess(key: str, value: str, message: str) -> None:
    with pytest.raises(AsfdaError) as info:
        load_config(None, {key: value})
    assert info.value.problem == message


def test_run_config_takes_every_valid_value() -> None:
    for key, options in (("diversity", DIVERSITY_SPACES), ("round0_gap", ROUND0_GAPS),
                         ("representativeness", REPRESENTATIVENESS), ("semi.pseudo_from", PSEUDO_SOURCES),
                         ("train.augmentation", AUGMENTATIONS), ("train.precision", PRECISIONS),
                         ("output_activation", OUTPUT_ACTIVATIONS)):
        for value in options:
            cfg = load_config(None, {key: value})
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value
    assert load_config(None, {}).output_activation is None  # None: what the model declares


def test_the_config_file_is_named(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("diversity: anatomyy\n")
    with pytest.raises(AsfdaError) as info:
        load_config(path)
    assert info.value.path == str(path) and "(did you mean 'anatomy'?)" in info.value.problem


def test_strategy_trainer_augmenter_and_engine_use_the_same_check() -> None:
    with pytest.raises(AsfdaError, match=r"diversity must be one of \['anatomy', 'embedding', 'none', 'batch'\], got "
                                         r"'anatomie' \(did you mean 'anatomy'\?\)"):
        ASFDAStrategy(diversity="anatomie")
    with pytest.raises(AsfdaError, match=r"round0_gap .* \(did you mean 'feature_gap'\?\)"):
        ASFDAStrategy(round0_gap="feature-gap")
    with pytest.raises(AsfdaError, match=r"representativeness .* \(did you mean 'density'\?\)"):
        ASFDAStrategy(representativeness="densty")
    with pytest.raises(ValueError, match=r"^augmentation must be one of \('none', 'intensity', 'spatial_mr'\), got "
                                         r"'intensty' \(did you mean 'intensity'\?\)$"):
        PatchAugmenter("intensty", (8, 8, 8), 0)
    from asfda.training import TrainVolume, finetune

    vol = TrainVolume(torch.zeros(1, 8, 8, 8), torch.zeros(8, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^precision must be one of \('fp32', 'bf16'\), got 'bf17' \(did you mean "
                                         r"'bf16'\?\)$"):
        finetune(torch.nn.Conv3d(1, 2, 1), [vol], TrainConfig(precision="bf17"), patch_size=(8, 8, 8),
                 progress=False)
    from asfda.engine import InferenceEngine

    with pytest.raises(AsfdaError) as info:
        InferenceEngine(torch.nn.Conv3d(1, 2, 1), (8, 8, 8), precision="fp16", embedding_layer="output")
    assert info.value.problem == "inference precision must be one of fp32, bf16, got 'fp16' (did you mean 'fp32'?)"
    assert info.value.fix == "use --precision fp32 or bf16"


def test_check_option_returns_the_value_and_ties_go_to_the_longest_shared_beginning_then_the_first_listed() -> None:
    assert check_option("bf16", PRECISIONS, "precision") == "bf16"
    # 'bf32' is 2 edits from both: the one sharing the longer beginning wins, whatever the order
    assert closest_option("bf32", ("fp32", "bf16")) == "bf16"
    assert closest_option("bf32", ("bf16", "fp32")) == "bf16"
    # a full tie goes to the first listed (look_up_option's own guess here follows the set's iteration order, which
    # PYTHONHASHSEED changes from one process to the next)
    assert closest_option("ab", ("ax", "ay")) == "ax"
    assert closest_option("ab", ("ay", "ax")) == "ay"
    assert closest_option("abcdefgh", ("fp32", "bf16")) is None
    assert closest_option(3, ("fp32", "bf16")) is None
    with pytest.raises(AsfdaError, match=r"got 3$"):
        check_option(3, ("fp32", "bf16"), "precision")
    with pytest.raises(AsfdaError, match=r"got None$"):
        check_option(None, ("a-long-name", "another"), "x")


def test_a_short_option_is_not_offered_for_any_short_word() -> None:
    # at most half the option's length in edits: 'lr' is 2 edits from 'xy' and 3 from 'foo', no misspelling of it
    assert closest_option("xy", ("lr", "seed")) is None
    assert closest_option("foo", ("lr",)) is None
    assert closest_option("l", ("lr",)) == "lr"
